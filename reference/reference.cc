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

// Every shard in one WorkerService behind an in-process data plane, and a
// trainer replica per rank.
class InProcessCluster {
 public:
  explicit InProcessCluster(const config::SwitchyardConfig& config)
      : config_(config), service_(config, "reference") {}
  ~InProcessCluster() {
    if (trainer_plane_) trainer_plane_->Shutdown();
    if (worker_plane_) worker_plane_->Shutdown();
    service_.Shutdown();
  }

  Status Start() {
    trainer::SetMatMulThreads(config_.training().threads());
    RETURN_IF_ERROR(service_.Start());
    worker_plane_ = transport::NewInProcessDataPlane();
    RETURN_IF_ERROR(worker_plane_->Start(
        [this](transport::Message request, transport::Reply reply) {
          service_.Handle(std::move(request), std::move(reply));
        }));
    const control::RoutingTable routing =
        ReferenceRouting(config_, worker_plane_->address());
    RETURN_IF_ERROR(service_.ApplyRouting(routing));
    trainer_plane_ = transport::NewInProcessDataPlane();
    RETURN_IF_ERROR(
        trainer_plane_->Start(transport::RefuseRequests("a trainer")));
    for (int rank = 0; rank < config_.cluster().trainers(); ++rank) {
      owned_.push_back(std::make_unique<trainer::TrainerReplica>(
          config_, rank, trainer_plane_.get()));
      owned_.back()->SetRouting(routing);
      replicas_.push_back(owned_.back().get());
    }
    return OkStatus();
  }

  const std::vector<trainer::TrainerReplica*>& replicas() const {
    return replicas_;
  }
  // Stops the data planes (the service keeps its shards).
  void StopTraffic() {
    trainer_plane_->Shutdown();
    worker_plane_->Shutdown();
  }
  std::map<std::string, std::string> ShardDigests() {
    return service_.ShardDigests();
  }

 private:
  const config::SwitchyardConfig& config_;
  expert_worker::WorkerService service_;
  std::unique_ptr<transport::DataPlane> worker_plane_;
  std::unique_ptr<transport::DataPlane> trainer_plane_;
  std::vector<std::unique_ptr<trainer::TrainerReplica>> owned_;
  std::vector<trainer::TrainerReplica*> replicas_;
};

}  // namespace

StatusOr<ReferenceResult> RunReference(const config::SwitchyardConfig& config,
                                       const trainer::ByteCorpus& corpus,
                                       const trainer::TrainingOptions& options,
                                       const std::atomic<bool>* stopping,
                                       std::ostream& out) {
  InProcessCluster cluster(config);
  RETURN_IF_ERROR(cluster.Start());
  ASSIGN_OR_RETURN(
      trainer::TrainingResult training,
      trainer::RunTraining(config, corpus, options, cluster.replicas(),
                           /*first_step=*/0, stopping, out));
  cluster.StopTraffic();
  ReferenceResult result;
  result.training = training;
  result.digests = cluster.ShardDigests();
  return result;
}

StatusOr<trainer::TextLoss> ReferenceTextLoss(
    const config::SwitchyardConfig& config, const std::string& text,
    int64_t max_windows) {
  InProcessCluster cluster(config);
  RETURN_IF_ERROR(cluster.Start());
  return trainer::EvaluateText(cluster.replicas().front(), /*step=*/0, text,
                               config.training().batch_size(), max_windows);
}

}  // namespace switchyard::reference
