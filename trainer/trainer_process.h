// `switchyard train`: one data-parallel trainer process.
//
// Joins the cluster with its rank, waits for a routing table that places
// every shard, trains training.steps steps on training.data_path
// (trainer/training.h) with the workers over the UCX data plane, prints
// progress (rank 0), and leaves the cluster when done.
#ifndef SWITCHYARD_TRAINER_TRAINER_PROCESS_H_
#define SWITCHYARD_TRAINER_TRAINER_PROCESS_H_

#include <string>

#include "common/status.h"
#include "config.pb.h"
#include "trainer/training.h"

namespace switchyard::trainer {

struct TrainerOptions {
  std::string name;  // Empty: "trainer-<rank>".
  int rank = 0;
  TrainingOptions training;
};

// Loads training.data_path, or says what is wrong with it.
StatusOr<ByteCorpus> LoadCorpus(const config::SwitchyardConfig& config);

// Runs until training ends (OK), SIGTERM/SIGINT (OK), or an error.
Status RunTrainer(const config::SwitchyardConfig& config,
                  const std::string& secret, const TrainerOptions& options);

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_TRAINER_PROCESS_H_
