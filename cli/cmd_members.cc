// switchyard coordinator | worker | train: the long-running processes.
#include <boost/asio.hpp>
#include <iomanip>
#include <iostream>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "common/digest.h"
#include "common/files.h"
#include "coordinator/coordinator_service.h"
#include "expert_worker/worker_process.h"
#include "reference/reference.h"
#include "trainer/trainer_process.h"
#include "transport/control/auth.h"

namespace switchyard::cli {
namespace {

// Loads the configuration and the secret, or prints why not.
bool LoadConfigAndSecret(const ConfigFlags& flags, LoadedConfig* loaded,
                         std::string* secret) {
  auto config = flags.Load();
  if (!config.ok()) {
    std::cerr << "switchyard: " << config.status().message() << "\n";
    return false;
  }
  *loaded = std::move(config).value();
  auto s = control::ReadSecretFile(loaded->config.cluster().secret_file());
  if (!s.ok()) {
    std::cerr << "switchyard: " << s.status().message() << "\n";
    return false;
  }
  *secret = std::move(s).value();
  return true;
}

int Finish(const Status& s) {
  if (s.ok()) return 0;
  std::cerr << "switchyard: " << s.ToString() << "\n";
  return s.code() == StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace

int CoordinatorCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard coordinator --config FILE [flags]",
      "Runs the coordinator: membership, placement, routing tables, the\n"
      "commit of checkpoints. Its state lives in <cluster.state_dir>/\n"
      "coordinator; a restart resumes it, and training resumes from the\n"
      "newest committed checkpoint unless --fresh or --from-step say\n"
      "otherwise.");
  ConfigFlags flags;
  flags.Register(&parser);
  ResumeFlags resume;
  resume.Register(&parser);
  MetricsFlag metrics;
  metrics.Register(&parser);
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;
  LoadedConfig loaded;
  std::string secret;
  if (!LoadConfigAndSecret(flags, &loaded, &secret)) return 2;
  auto metrics_server = metrics.Start();
  if (!metrics_server.ok()) return Finish(metrics_server.status());

  auto store = coordinator::OpenCoordinatorStore(loaded.config);
  if (!store.ok()) return Finish(store.status());

  boost::asio::io_context io;
  coordinator::CoordinatorService service(io, loaded.config, secret,
                                          std::move(store).value());
  service.SetResume(resume.fresh, resume.from_step);
  Status started = service.Start();
  if (!started.ok()) return Finish(started);
  boost::asio::signal_set signals(io, SIGTERM, SIGINT);
  signals.async_wait([&](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    LOG(INFO) << "coordinator: received signal " << sig << ", stopping";
    service.Shutdown();
    io.stop();
  });
  io.run();
  return Finish(service.failure());
}

int WorkerCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard worker --config FILE --name NAME [flags]",
      "Runs an expert worker: joins the cluster and hosts the shards the\n"
      "coordinator places on it. SIGTERM/SIGINT drain it first (its shards\n"
      "move live to the other workers at a step boundary), then it leaves\n"
      "and exits 0; `switchyard drain NAME` does the same without a signal.");
  ConfigFlags flags;
  flags.Register(&parser);
  expert_worker::WorkerOptions options;
  parser.AddString("name", &options.name,
                   "stable worker name, e.g. worker-0 (required)");
  int64_t capacity = 0;
  parser.AddInt("capacity-bytes", &capacity,
                "memory offered for shards (0: cluster.worker_capacity_bytes)");
  parser.AddString("device", &options.device, "cpu or cuda:N");
  parser.AddString("data-address", &options.data_address,
                   "data-plane address advertised to trainers");
  parser.AddBool("drain-on-stop", &options.drain_on_stop,
                 "on SIGTERM/SIGINT hand every shard to the other workers "
                 "before leaving (false: leave at once; the cluster then "
                 "recovers the shards from the newest committed checkpoint)");
  MetricsFlag metrics;
  metrics.Register(&parser);
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;
  options.capacity_bytes = capacity;
  LoadedConfig loaded;
  std::string secret;
  if (!LoadConfigAndSecret(flags, &loaded, &secret)) return 2;
  auto metrics_server = metrics.Start();
  if (!metrics_server.ok()) return Finish(metrics_server.status());
  return Finish(expert_worker::RunWorker(loaded.config, secret, options));
}

int TrainCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard train --config FILE --rank R [flags]\n"
      "       switchyard train --config FILE --reference [flags]",
      "Runs one data-parallel trainer with rank R in [0, cluster.trainers):\n"
      "it trains training.steps steps on --data with the cluster's workers,\n"
      "rank 0 printing progress, validation loss, a summary and a sample,\n"
      "then leaves. SIGTERM/SIGINT leave the cluster cleanly.\n"
      "\n"
      "--reference runs the whole job in this one process instead: every\n"
      "rank in turn, the workers' code behind an in-process data plane, no\n"
      "coordinator. It prints the same lines, then the digest of every\n"
      "shard; a distributed run with the same configuration ends with the\n"
      "same digests (its workers log them).\n"
      "\n"
      "--reference --eval-text FILE trains nothing: it prints the loss of\n"
      "the initial parameters (checkpoint.init_from, e.g. a `ckpt export`\n"
      "directory) on FILE, read as windows of model.seq_len + 1 bytes at\n"
      "offsets 0, seq_len, 2 * seq_len, ..., training.batch_size windows per\n"
      "forward pass: `text loss L over N windows (T tokens)`.");
  ConfigFlags flags;
  flags.Register(&parser);
  trainer::TrainerOptions options;
  int64_t rank = 0, sample_bytes = options.training.sample_bytes;
  bool reference = false;
  parser.AddInt("rank", &rank, "data-parallel rank");
  parser.AddString("name", &options.name,
                   "member name (default trainer-<rank>)");
  parser.AddBool("reference", &reference,
                 "run the single-process reference (no cluster)");
  std::string eval_text;
  int64_t eval_windows = 0;
  parser.AddString("eval-text", &eval_text,
                   "with --reference: print the loss on this file instead of "
                   "training");
  parser.AddInt("eval-windows", &eval_windows,
                "with --eval-text: at most this many windows (0: all)");
  parser.AddInt("sample-bytes", &sample_bytes,
                "bytes of text to generate at the end (0: none)");
  parser.AddString("sample-prompt", &options.training.sample_prompt,
                   "text the sample continues");
  MetricsFlag metrics;
  metrics.Register(&parser);
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;
  if (!eval_text.empty() && !reference) {
    std::cerr << "switchyard: --eval-text needs --reference\n";
    return 2;
  }
  options.rank = static_cast<int>(rank);
  options.training.sample_bytes = static_cast<int>(sample_bytes);
  if (reference) {
    auto loaded = flags.Load();
    if (!loaded.ok()) return Finish(loaded.status());
    const auto& config = loaded->config;
    if (!eval_text.empty()) {
      // Device files and absurd sizes are refused (1 GiB is plenty).
      auto text = ReadRegularFile(eval_text, uint64_t{1} << 30);
      if (!text.ok()) return Finish(text.status());
      auto loss = reference::ReferenceTextLoss(config, *text, eval_windows);
      if (!loss.ok()) return Finish(loss.status());
      std::cout << std::setprecision(17) << "text loss " << loss->loss
                << " over " << loss->windows << " windows (" << loss->tokens
                << " tokens)" << std::endl;
      return 0;
    }
    auto corpus = trainer::LoadCorpus(config);
    if (!corpus.ok()) return Finish(corpus.status());
    auto result = reference::RunReference(config, *corpus, options.training,
                                          nullptr, std::cout);
    if (!result.ok()) return Finish(result.status());
    for (const auto& [shard, hex] : result->digests) {
      std::cout << "digest " << shard << " " << hex << "\n";
    }
    std::cout << "model digest " << CombineDigests(result->digests)
              << std::endl;
    return 0;
  }
  LoadedConfig loaded;
  std::string secret;
  if (!LoadConfigAndSecret(flags, &loaded, &secret)) return 2;
  auto metrics_server = metrics.Start();
  if (!metrics_server.ok()) return Finish(metrics_server.status());
  return Finish(trainer::RunTrainer(loaded.config, secret, options));
}

}  // namespace switchyard::cli
