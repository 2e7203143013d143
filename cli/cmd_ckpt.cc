// switchyard ckpt ls | verify [STEP] | export STEP --out DIR.
#include <iostream>

#include "cli/checkpoint_tools.h"
#include "cli/commands.h"
#include "cli/config_flags.h"

namespace switchyard::cli {

int CkptCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard ckpt ls|verify [STEP]|export STEP --out DIR "
      "[--run-dir DIR | --config FILE]\n"
      "       switchyard ckpt import PATH --config FILE",
      "Committed checkpoints of a run, read from its run directory (the\n"
      "coordinator's state and the workers' stores; safe while it runs):\n"
      "  ls              steps, commit time, shards, bytes, holders\n"
      "  verify [STEP]   read every shard (default: the newest checkpoint),\n"
      "                  checking every chunk checksum, the manifests and the\n"
      "                  committed digests, then every file of the stores\n"
      "                  holding them against its RocksDB file checksum;\n"
      "                  exit 1 if anything is wrong\n"
      "  export STEP     write the model's parameters as safetensors files\n"
      "                  with an index JSON and config.json (the model's\n"
      "                  description) into --out (docs/pytorch.md)\n"
      "  import PATH     check safetensors (an export, or a file) against\n"
      "                  --config's model and show what a run started with\n"
      "                  checkpoint.init_from=PATH begins from (sparse\n"
      "                  upcycling: experts from a dense FFN)");
  ConfigFlags flags;
  flags.Register(&parser);
  std::string run_dir, out_dir;
  parser.AddString("run-dir", &run_dir,
                   "the run directory (default: cluster.state_dir)");
  parser.AddString("out", &out_dir, "export: the output directory");
  Status parsed = parser.Parse(argc, argv, 2);
  if (parser.help_requested()) {
    std::cout << parser.Help();
    return 0;
  }
  const auto& args = parser.positional();
  if (!parsed.ok() || args.empty() || args.size() > 2 ||
      (args[0] != "ls" && args[0] != "verify" && args[0] != "export" &&
       args[0] != "import")) {
    std::cerr << "switchyard: "
              << (parsed.ok()
                      ? "expected ls, verify [STEP], export STEP or import PATH"
                      : parsed.message())
              << " (see switchyard ckpt --help)\n";
    return 2;
  }
  if (args[0] == "import") {
    auto loaded = flags.Load();
    if (args.size() != 2 || !loaded.ok()) {
      std::cerr << "switchyard: import needs PATH and a valid --config"
                << (loaded.ok() ? "" : ": " + loaded.status().message())
                << "\n";
      return 2;
    }
    Status s = DescribeImport(loaded->config, args[1], std::cout);
    if (!s.ok()) {
      std::cerr << "switchyard: " << s.ToString() << "\n";
      return 1;
    }
    return 0;
  }
  int64_t step = 0;
  if (args.size() == 2) {
    try {
      step = std::stoll(args[1]);
    } catch (...) {
      step = -1;
    }
    if (step <= 0) {
      std::cerr << "switchyard: STEP must be a positive number, not '"
                << args[1] << "'\n";
      return 2;
    }
  }
  if (args[0] == "export" && (step == 0 || out_dir.empty())) {
    std::cerr << "switchyard: export needs STEP and --out DIR\n";
    return 2;
  }
  if (run_dir.empty()) {
    auto loaded = flags.Load();
    if (!loaded.ok()) {
      std::cerr << "switchyard: " << loaded.status().message() << "\n";
      return 2;
    }
    run_dir = loaded->config.cluster().state_dir();
  }
  auto state = ReadCoordinatorState(run_dir);
  if (!state.ok()) {
    std::cerr << "switchyard: " << state.status().ToString() << "\n";
    return 1;
  }
  // The run's own configuration, with its state directory where it is now.
  config::SwitchyardConfig config = state->config();
  config.mutable_cluster()->set_state_dir(run_dir);
  if (args[0] == "ls") {
    ListCheckpoints(*state, std::cout);
    return 0;
  }
  auto commit = FindCommitted(*state, step);
  if (!commit.ok()) {
    std::cerr << "switchyard: " << commit.status().message() << "\n";
    return 1;
  }
  Status s = args[0] == "verify"
                 ? VerifyCheckpoint(config, *commit, std::cout)
                 : ExportCheckpoint(config, *commit, out_dir, std::cout);
  if (!s.ok()) {
    std::cerr << "switchyard: " << s.ToString() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace switchyard::cli
