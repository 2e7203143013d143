#include "reference/reference.h"

#include <memory>
#include <vector>

#include "common/model_shape.h"
#include "common/shard_ref.h"
#include "expert_worker/worker_service.h"
#include "trainer/layers.h"
#include "transport/local/in_process_data_plane.h"

namespace switchyard::reference {
namespace {

// Every dense and expert shard of the model on one worker named "reference".
control::RoutingTable ReferenceRouting(const config::SwitchyardConfig& config,
                                       const std::string& data_address) {
  control::RoutingTable routing;
  routing.set_epoch(1);
  auto* w = routing.add_workers();
  w->set_name("reference");
  w->set_data_address(data_address);
  for (const ShardFootprint& fp : ModelShards(config)) {
    auto* e = routing.add_entries();
    *e->mutable_shard() = ToShardRef(fp.id);
    e->set_worker(0);
    e->set_bytes(fp.bytes);
  }
  return routing;
}

}  // namespace

StatusOr<ReferenceResult> RunReference(const config::SwitchyardConfig& config,
                                       const trainer::ByteCorpus& corpus,
                                       const trainer::TrainingOptions& options,
                                       const std::atomic<bool>* stopping,
                                       std::ostream& out) {
  trainer::SetMatMulThreads(config.training().threads());
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
  std::vector<std::unique_ptr<trainer::TrainerReplica>> owned;
  std::vector<trainer::TrainerReplica*> replicas;
  for (int rank = 0; rank < config.cluster().trainers(); ++rank) {
    owned.push_back(std::make_unique<trainer::TrainerReplica>(
        config, rank, trainer_plane.get()));
    owned.back()->SetRouting(routing);
    replicas.push_back(owned.back().get());
  }
  ReferenceResult result;
  StatusOr<trainer::TrainingResult> training = trainer::RunTraining(
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

}  // namespace switchyard::reference
