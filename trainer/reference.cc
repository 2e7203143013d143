#include "trainer/reference.h"

#include <memory>
#include <vector>

#include "expert_worker/worker_service.h"
#include "trainer/layers.h"
#include "transport/local/in_process_data_plane.h"

namespace switchyard::trainer {

StatusOr<ReferenceResult> RunReference(const config::SwitchyardConfig& config,
                                       const ByteCorpus& corpus,
                                       const TrainingOptions& options,
                                       const std::atomic<bool>* stopping,
                                       std::ostream& out) {
  SetMatMulThreads(config.training().threads());
  expert_worker::WorkerService service(config, "reference");
  RETURN_IF_ERROR(service.Start());
  auto worker_plane = transport::NewInProcessDataPlane();
  RETURN_IF_ERROR(worker_plane->Start(
      [&service](transport::Message request, transport::Reply reply) {
        service.Handle(std::move(request), std::move(reply));
      }));
  const control::RoutingTable routing =
      ReferenceRouting(config, worker_plane->address());
  RETURN_IF_ERROR(service.ApplyRouting(routing));

  auto trainer_plane = transport::NewInProcessDataPlane();
  RETURN_IF_ERROR(trainer_plane->Start(transport::RefuseRequests("a trainer")));
  std::vector<std::unique_ptr<TrainerReplica>> owned;
  std::vector<TrainerReplica*> replicas;
  for (int rank = 0; rank < config.cluster().trainers(); ++rank) {
    owned.push_back(
        std::make_unique<TrainerReplica>(config, rank, trainer_plane.get()));
    owned.back()->SetRouting(routing);
    replicas.push_back(owned.back().get());
  }
  ReferenceResult result;
  StatusOr<TrainingResult> training = RunTraining(
      config, corpus, options, replicas, /*first_step=*/0, stopping, out);
  trainer_plane->Shutdown();
  worker_plane->Shutdown();
  if (training.ok()) {
    result.training = *training;
    result.digests = service.ShardDigests();
  }
  service.Shutdown();
  if (!training.ok()) return training.status();
  return result;
}

}  // namespace switchyard::trainer
