// The single-process reference: every rank of a run, each on a thread of
// its own, in one process, with the workers' code (WorkerService, hosting every
// shard) behind an in-process data plane. The same compute code as a
// distributed run without any network, so the two can be compared bit for bit
// (`switchyard train --reference`; the determinism tests). A component of
// its own, above trainer/ and expert_worker/ (it runs both).
#ifndef SWITCHYARD_REFERENCE_REFERENCE_H_
#define SWITCHYARD_REFERENCE_REFERENCE_H_

#include <atomic>
#include <map>
#include <ostream>
#include <string>

#include "common/status.h"
#include "config.pb.h"
#include "trainer/training.h"

namespace switchyard::reference {

struct ReferenceResult {
  trainer::TrainingResult training;
  // Digest (hex) of every shard's parameters and optimizer state after the
  // last step, by shard name ("D0", "L0.E3.S0").
  std::map<std::string, std::string> digests;
};

// The loss of the run's initial parameters (random, or
// checkpoint.init_from) on `text`, as trainer::EvaluateText with
// training.batch_size windows per pass. Nothing is trained.
StatusOr<trainer::TextLoss> ReferenceTextLoss(
    const config::SwitchyardConfig& config, const std::string& text,
    int64_t max_windows);

StatusOr<ReferenceResult> RunReference(const config::SwitchyardConfig& config,
                                       const trainer::ByteCorpus& corpus,
                                       const trainer::TrainingOptions& options,
                                       const std::atomic<bool>* stopping,
                                       std::ostream& out);

}  // namespace switchyard::reference

#endif  // SWITCHYARD_REFERENCE_REFERENCE_H_
