// `switchyard train`: one data-parallel trainer process.
//
// For now it joins the cluster with its rank and follows the routing table;
// the model, router and training loop arrive with the trainer work
// (docs/architecture.md).
#ifndef SWITCHYARD_TRAINER_TRAINER_PROCESS_H_
#define SWITCHYARD_TRAINER_TRAINER_PROCESS_H_

#include <string>

#include "common/status.h"
#include "config.pb.h"

namespace switchyard::trainer {

struct TrainerOptions {
  std::string name;  // Empty: "trainer-<rank>".
  int rank = 0;
};

// Runs until SIGTERM/SIGINT.
Status RunTrainer(const config::SwitchyardConfig& config,
                  const std::string& secret, const TrainerOptions& options);

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_TRAINER_PROCESS_H_
