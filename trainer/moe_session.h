// A trainer whose model runs in another program: the PyTorch front end
// (python/switchyard, docs/pytorch.md) holds one per process. It joins the
// cluster as trainer `rank`, follows the routing tables, and runs the MoE
// layers' dispatch and combine (MoeLayerClient) and the step's end
// (StepDone) with the cluster's experts. The dense part of the model, its
// router and their optimizer are the caller's; the cluster's dense shards
// are not used (they receive no gradient and do not change).
//
// Steps: the session starts at the routing table's resume step; Forward,
// Backward and Evaluate act at step(); StepDone ends it on every worker and
// moves to the next. Between a StepDone and the next step's first call the
// session is at a step boundary: there it stops for a live move
// (RoutingTable.pause: a worker joins or is drained), and adopts a newer
// epoch that continues from its step (the move made, or a hold after
// another trainer's failure), waiting up to cluster.move_timeout_ms plus
// the join timeout. When the cluster moves to a newer routing epoch that
// does not continue from the session's step (a member died or was fenced
// mid-step, a rollback), the step in flight is abandoned:
// the session leaves the cluster (so that it never comes back as a new
// incarnation of its own accord) and every later call fails with ABORTED
// naming the epoch, its cause and the step it resumes at. The caller's
// dense model must go back to that step too, which this session cannot do
// for it: close it and connect a new one. Every wait has a deadline; every
// failure is a Status with Switchyard's text.
//
// The configuration must be the cluster's where it matters to a trainer
// (the model, cluster.trainers, training.micro_batches and
// eval_capacity_factor and wire_dtype): Connect compares it with
// the coordinator's and fails naming what differs.
//
// Thread-safe: calls are serialized (the control thread inside is its
// own).
#ifndef SWITCHYARD_TRAINER_MOE_SESSION_H_
#define SWITCHYARD_TRAINER_MOE_SESSION_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "common/tensor.h"
#include "config.pb.h"
#include "trainer/cluster_view.h"
#include "trainer/moe_client.h"
#include "trainer/router.h"
#include "transport/data_plane.h"

namespace switchyard::trainer {

struct MoeSessionOptions {
  config::SwitchyardConfig config;  // The cluster's, validated.
  std::string secret;               // The cluster secret.
  int rank = 0;                     // In [0, cluster.trainers).
  std::string name;                 // Member name; empty: trainer-<rank>.
};

class MoeSession {
 public:
  // Registers (deadline: cluster.call_timeout_ms x 6) and waits until every
  // shard is reachable (cluster.call_timeout_ms x 12 more).
  static StatusOr<std::unique_ptr<MoeSession>> Connect(
      MoeSessionOptions options);
  ~MoeSession();  // Close().

  const config::SwitchyardConfig& config() const { return options_.config; }
  int64_t step() const { return step_; }
  uint64_t epoch() const { return epoch_; }

  // x: (T, d_model) fp32. `route` holds T, E, k and the (T, k) expert,
  // gate and kept arrays (checked: expert ids in [0, E), sizes). Returns
  // y (T, d_model) = sum_j kept_tj * gate_tj * expert_{e_tj}(x_t); the
  // workers keep what Backward needs, per (layer, micro_batch).
  StatusOr<Tensor> Forward(int layer, int micro_batch, const Tensor& x,
                           const RouterState<float>& route) EXCLUDES(call_mu_);
  // The same without training state (evaluation).
  StatusOr<Tensor> Evaluate(int layer, const Tensor& x,
                            const RouterState<float>& route) EXCLUDES(call_mu_);
  // dy: (T, d_model), finite (a NaN or infinity is refused before it
  // reaches the workers, which would stop the run). Writes dx (T, d_model)
  // and d_gate (T, k).
  Status Backward(int layer, int micro_batch, const Tensor& dy, Tensor* dx,
                  std::vector<float>* d_gate) EXCLUDES(call_mu_);
  // Ends step() on every worker (they apply it once every rank has), then
  // moves to the next step.
  Status StepDone() EXCLUDES(call_mu_);
  // Leaves the cluster. Idempotent.
  Status Close() EXCLUDES(call_mu_);

 private:
  explicit MoeSession(MoeSessionOptions options);
  Status Start();
  // OK while the cluster is at the epoch this session trains under (else
  // the session leaves: see above) and its configuration is the cluster's.
  Status CheckEpoch();
  // At a step boundary: waits out a pause for a live move and adopts a
  // newer epoch that continues from step_ (see above); then CheckEpoch.
  Status EnterStep() REQUIRES(call_mu_);
  // What differs between `cluster`'s configuration and options_.config
  // where it matters to a trainer ("" when nothing).
  std::string ConfigDifference(const config::SwitchyardConfig& cluster) const;
  Status CheckCall(int layer, int micro_batch) const;
  Status CheckRoute(int layer, const Tensor& x,
                    const RouterState<float>& route) const;

  const MoeSessionOptions options_;
  Mutex call_mu_;  // Serializes the public calls.
  ClusterNews news_;
  PeerLostReporter lost_{&news_};
  std::unique_ptr<transport::DataPlane> data_plane_;
  std::unique_ptr<MoeLayerClient> client_;
  std::thread member_thread_;
  // The member thread's state, under news_.mu.
  bool ready_ GUARDED_BY(news_.mu) = false;
  bool closing_ GUARDED_BY(news_.mu) = false;
  bool member_done_ GUARDED_BY(news_.mu) = false;
  Status member_status_ GUARDED_BY(news_.mu);
  // The table the member found ready to train with.
  control::RoutingTable ready_routing_ GUARDED_BY(news_.mu);
  // ConfigDifference with the coordinator's configuration at registration.
  std::string config_difference_ GUARDED_BY(news_.mu);
  // The epoch training runs under (0: not yet), read by the control thread.
  std::atomic<uint64_t> training_epoch_{0};
  std::atomic<int64_t> step_{0};
  // At a step boundary: nothing of step_ sent yet.
  bool at_boundary_ GUARDED_BY(call_mu_) = true;
  // Stopped there for a move, reported in heartbeats.
  std::atomic<bool> paused_{false};
  // At a boundary with nothing in flight, set and cleared under news_.mu
  // (the heartbeat reports it as paused while a pause is asked for).
  bool idle_at_boundary_ GUARDED_BY(news_.mu) = true;
  // The member's session, for reports that cannot wait for a heartbeat.
  std::shared_ptr<control::MemberSession> session_ GUARDED_BY(news_.mu);
  uint64_t epoch_ = 0;
  int64_t resume_step_ = 0;
};

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_MOE_SESSION_H_
