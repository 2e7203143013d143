// switchyard up: a whole local cluster as child processes.
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/process_group.h"
#include "cli/status_client.h"
#include "common/model_shape.h"
#include "coordinator/placement.h"
#include "transport/control/auth.h"

namespace switchyard::cli {
namespace {

using Ms = std::chrono::milliseconds;

std::string SelfExe() {
  std::error_code ec;
  auto path = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? "switchyard" : path.string();
}

// True when the status shows every expected member alive and placement made.
// OK when the placement rules can place every shard of the model on
// `workers` workers of cluster.worker_capacity_bytes each; else why not.
Status CheckPlaceable(const config::SwitchyardConfig& config, int workers) {
  coordinator::PlacementInput input;
  input.shards = ModelShards(config);
  for (int i = 0; i < workers; ++i) {
    input.workers.push_back({"worker-" + std::to_string(i),
                             config.cluster().worker_capacity_bytes()});
  }
  const coordinator::PlacementResult result =
      coordinator::ComputePlacement(input);
  return result.status.WithContext(
      "--workers " + std::to_string(workers) +
      " with cluster.worker_capacity_bytes " +
      std::to_string(config.cluster().worker_capacity_bytes()));
}

bool AllWorkersAlive(const control::StatusResponse& s, int workers) {
  int live = 0;
  for (const auto& m : s.members()) {
    live += m.state() == control::ALIVE && m.kind() == control::WORKER;
  }
  return live == workers;
}

// Ready: every worker alive and the model placed, and every trainer `up`
// started alive (with --trainers 0 the trainers are other programs', which
// may join before or after).
bool ClusterReady(const control::StatusResponse& s, int workers, int trainers) {
  int live_workers = 0, live_trainers = 0;
  for (const auto& m : s.members()) {
    if (m.state() != control::ALIVE) continue;
    (m.kind() == control::WORKER ? live_workers : live_trainers)++;
  }
  return s.placed() && live_workers == workers &&
         (trainers == 0 || live_trainers == trainers);
}

}  // namespace

int UpCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard up --workers N [--trainers M] --config FILE [flags]",
      "Starts a local cluster: a coordinator, N workers and M trainers as\n"
      "child processes, with their logs prefixed by name. Prints the cluster\n"
      "status once every member has joined. When every trainer has finished\n"
      "training, or on Ctrl-C (or SIGTERM, or the end of --duration-s), it\n"
      "stops them all: the coordinator first, so that its saved placement is\n"
      "the whole cluster's, then the members. Exits 0 when every trainer\n"
      "finished cleanly (or was stopped), 1 otherwise.\n"
      "\n"
      "It supervises its children as systemd or Kubernetes would: a member\n"
      "killed by a signal (a crash, kill -9, the OOM killer), or a worker\n"
      "exiting with an error, is started again under its name after a\n"
      "backoff (0.2 s, doubling to 5 s; back to 0.2 s once it has stayed up\n"
      "30 s), at most --max-restarts times each; the coordinator comes back\n"
      "on its address. A trainer or coordinator exiting with an error refused\n"
      "to go on: the cluster stops. Children never outlive `up`, even a\n"
      "SIGKILLed one.\n"
      "\n"
      "--trainers 0 starts no trainer: cluster.trainers trainers of another\n"
      "program (python/switchyard's, docs/pytorch.md) join with the\n"
      "configuration and --run-dir; `up` then runs until Ctrl-C, SIGTERM or\n"
      "--duration-s.");
  ConfigFlags flags;
  flags.Register(&parser);
  int64_t workers = 2, trainers = 1, port = 0, duration_s = 0;
  int64_t ready_timeout_s = 60;
  int64_t max_restarts = 20;
  std::string run_dir;
  parser.AddInt("workers", &workers, "expert workers to start");
  parser.AddInt("trainers", &trainers, "trainers to start");
  parser.AddString(
      "run-dir", &run_dir,
      "state, secret and address files (default cluster.state_dir)");
  parser.AddInt("port", &port, "coordinator port (0: any free port)");
  parser.AddInt(
      "duration-s", &duration_s,
      "stop after this many seconds once ready (0: run until Ctrl-C)");
  parser.AddInt("ready-timeout-s", &ready_timeout_s,
                "give up if the cluster is not ready within this time");
  parser.AddInt("max-restarts", &max_restarts,
                "restarts of each member before `up` gives up (0: none)");
  std::vector<std::string> member_sets, netns_flags;
  parser.AddRepeated(
      "member-set", &member_sets,
      "NAME:section.field=value: a config override for one member only "
      "(e.g. worker-2:transport.data_host=10.0.0.2)");
  parser.AddRepeated(
      "netns", &netns_flags,
      "NAME=NETNS: run member NAME in network namespace NETNS (`ip netns "
      "exec`; needs root; for partition tests)");
  ResumeFlags resume;
  resume.Register(&parser);
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;
  if (workers < 1 || trainers < 0 || max_restarts < 0) {
    std::cerr << "switchyard: --workers must be >= 1, --trainers and "
                 "--max-restarts >= 0\n";
    return 2;
  }

  // Per-member overrides and namespaces, by member name.
  const auto is_member = [&](const std::string& name) {
    for (int64_t i = 0; i < std::max(workers, trainers); ++i) {
      if ((i < workers && name == "worker-" + std::to_string(i)) ||
          (i < trainers && name == "trainer-" + std::to_string(i))) {
        return true;
      }
    }
    return false;
  };
  std::map<std::string, std::vector<std::string>> member_overrides;
  for (const std::string& m : member_sets) {
    const size_t colon = m.find(':');
    const std::string name = m.substr(0, colon);
    if (colon == std::string::npos || m.find('=', colon) == std::string::npos ||
        !is_member(name)) {
      std::cerr << "switchyard: --member-set " << m
                << ": want NAME:section.field=value with NAME worker-<i> or "
                   "trainer-<r> of this cluster\n";
      return 2;
    }
    member_overrides[name].push_back(m.substr(colon + 1));
  }
  std::map<std::string, std::string> netns;
  for (const std::string& n : netns_flags) {
    const size_t eq = n.find('=');
    const std::string name = n.substr(0, eq);
    if (eq == std::string::npos || eq + 1 == n.size() || !is_member(name)) {
      std::cerr << "switchyard: --netns " << n
                << ": want NAME=NETNS with NAME worker-<i> or trainer-<r> of "
                   "this cluster\n";
      return 2;
    }
    netns[name] = n.substr(eq + 1);
  }
  std::string ip_command;
  if (!netns.empty()) {
    for (const char* path : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"}) {
      if (ip_command.empty() && ::access(path, X_OK) == 0) ip_command = path;
    }
    if (ip_command.empty()) {
      std::cerr << "switchyard: --netns needs iproute2's ip command\n";
      return 2;
    }
  }

  // Resolve the run directory and secret before starting anything.
  auto base = flags.Load();
  if (!base.ok()) {
    std::cerr << "switchyard: " << base.status().message() << "\n";
    return 2;
  }
  // A model that N workers of this capacity cannot hold fails here, before
  // anything starts (workers would otherwise allocate what fits and wait).
  if (Status fits = CheckPlaceable(base->config, workers); !fits.ok()) {
    std::cerr << "switchyard: " << fits.message() << "\n";
    return 1;
  }
  if (run_dir.empty()) run_dir = base->config.cluster().state_dir();
  std::error_code ec;
  std::filesystem::create_directories(run_dir, ec);
  if (ec) {
    std::cerr << "switchyard: cannot create " << run_dir << ": " << ec.message()
              << "\n";
    return 1;
  }
  const std::string absolute_run_dir =
      std::filesystem::absolute(run_dir, ec).string();
  if (ec) {
    std::cerr << "switchyard: " << run_dir << ": " << ec.message() << "\n";
    return 1;
  }
  run_dir = absolute_run_dir;
  std::string secret_file = base->config.cluster().secret_file();
  if (secret_file.empty()) {
    secret_file = run_dir + "/secret";
    if (!std::filesystem::exists(secret_file, ec)) {
      Status s = control::WriteNewSecretFile(secret_file);
      if (!s.ok()) {
        std::cerr << "switchyard: " << s.message() << "\n";
        return 1;
      }
    }
  }
  auto secret = control::ReadSecretFile(secret_file);
  if (!secret.ok()) {
    std::cerr << "switchyard: " << secret.status().message() << "\n";
    return 2;
  }
  auto host = ParseHostPort(base->config.cluster().coordinator_address());
  if (!host.ok()) {
    std::cerr << "switchyard: " << host.status().message() << "\n";
    return 2;
  }

  std::vector<std::string> common_args;
  if (!flags.config_path.empty()) {
    // Absolute where it can be made so (else as given: the child fails
    // to read it and says so).
    const std::string config_path =
        std::filesystem::absolute(flags.config_path, ec).string();
    common_args = {"--config", ec ? flags.config_path : config_path};
  }
  auto add_set = [&common_args](const std::string& o) {
    common_args.push_back("--set");
    common_args.push_back(o);
  };
  for (const auto& o : flags.AllOverrides()) add_set(o);
  add_set("cluster.state_dir=" + run_dir);
  add_set("cluster.secret_file=" + secret_file);
  add_set("cluster.workers=" + std::to_string(workers));
  // With --trainers 0, cluster.trainers from the configuration says how many
  // trainers of other programs (the PyTorch front end) will join.
  if (trainers > 0) add_set("cluster.trainers=" + std::to_string(trainers));

  // Signals are handled synchronously below; children unblock them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  ::sigprocmask(SIG_BLOCK, &stop_signals, nullptr);

  const std::string exe = SelfExe();
  const std::string addr_file = run_dir + "/coordinator.addr";
  std::filesystem::remove(addr_file, ec);
  ProcessGroup group;
  // Each member's command line and restart state, for supervision.
  struct Supervised {
    std::vector<std::string> args;
    std::chrono::steady_clock::time_point started;
    int restarts = 0;
    Ms backoff{200};
    std::optional<std::chrono::steady_clock::time_point> restart_at;
  };
  std::map<std::string, Supervised> supervised;
  auto spawn = [&](const std::string& name, std::vector<std::string> args) {
    args.insert(args.begin(), exe);
    if (auto ns = netns.find(name); ns != netns.end()) {
      args.insert(args.begin(), {ip_command, "netns", "exec", ns->second});
    }
    auto pid = group.Spawn(name, args);
    if (!pid.ok()) {
      std::cerr << "[up] cannot start " << name << ": "
                << pid.status().message() << "\n";
      return false;
    }
    Supervised& s = supervised[name];
    s.args = std::move(args);
    s.started = std::chrono::steady_clock::now();
    return true;
  };
  auto print_events = [&group] {
    for (const auto& e : group.ReapExited()) std::cout << "[up] " << e << "\n";
  };
  auto stop_requested = [&stop_signals](Ms wait) {
    timespec ts{static_cast<time_t>(wait.count() / 1000),
                static_cast<long>(wait.count() % 1000) * 1000000};
    const int sig = ::sigtimedwait(&stop_signals, nullptr, &ts);
    return sig == SIGINT || sig == SIGTERM;
  };
  // The coordinator stops first, so that its saved placement is that of the
  // whole cluster (members leaving one by one would re-place their shards);
  // a later `up` on the same run directory resumes it.
  // A member that did not exit cleanly (a crash at shutdown, an assertion,
  // a kill) makes `up` fail, whatever else went well: its log says why.
  auto shutdown = [&](int code) {
    std::cout << "[up] stopping the cluster\n" << std::flush;
    group.Terminate({"coordinator"}, Ms(10000));
    group.Terminate({}, Ms(10000));
    print_events();
    const std::vector<std::string> abnormal = group.AbnormalExits();
    for (const std::string& a : abnormal) {
      std::cerr << "[up] not a clean exit: " << a << "\n";
    }
    return code == 0 && !abnormal.empty() ? 1 : code;
  };

  // 1. Coordinator, on the requested port; wait for its address file.
  std::vector<std::string> coordinator_args = {"coordinator"};
  coordinator_args.insert(coordinator_args.end(), common_args.begin(),
                          common_args.end());
  coordinator_args.push_back("--set");
  coordinator_args.push_back("cluster.coordinator_address=" + host->host + ":" +
                             std::to_string(port));
  for (const std::string& a : resume.Args()) coordinator_args.push_back(a);
  if (!spawn("coordinator", coordinator_args)) return shutdown(1);
  std::string address;
  const auto addr_deadline = std::chrono::steady_clock::now() + Ms(15000);
  while (address.empty()) {
    std::ifstream in(addr_file);
    if (in >> address) break;
    print_events();
    if (!group.IsRunning("coordinator")) {
      std::cerr << "[up] the coordinator exited during start-up\n";
      return shutdown(1);
    }
    if (std::chrono::steady_clock::now() > addr_deadline) {
      std::cerr << "[up] the coordinator did not publish its address in "
                << addr_file << " within 15 s\n";
      return shutdown(1);
    }
    if (stop_requested(Ms(50))) return shutdown(130);
  }
  std::cout << "[up] coordinator listening on " << address << "\n";
  {
    // A restarted coordinator comes back on the same address (members
    // reconnect to it) and resumes the run's state: never --fresh again.
    std::vector<std::string> again = {exe, "coordinator"};
    again.insert(again.end(), common_args.begin(), common_args.end());
    again.push_back("--set");
    again.push_back("cluster.coordinator_address=" + address);
    supervised["coordinator"].args = std::move(again);
  }

  // 2. Workers and trainers.
  auto with = [&](const std::string& name, std::vector<std::string> args) {
    args.insert(args.end(), common_args.begin(), common_args.end());
    args.push_back("--set");
    args.push_back("cluster.coordinator_address=" + address);
    for (const std::string& o : member_overrides[name]) {
      args.push_back("--set");
      args.push_back(o);
    }
    return args;
  };
  for (int i = 0; i < workers; ++i) {
    const std::string name = "worker-" + std::to_string(i);
    if (!spawn(name, with(name, {"worker", "--name", name,
                                 // `up` stops the whole cluster.
                                 "--drain-on-stop=false"}))) {
      return shutdown(1);
    }
  }
  for (int r = 0; r < trainers; ++r) {
    const std::string name = "trainer-" + std::to_string(r);
    if (!spawn(name, with(name, {"train", "--rank", std::to_string(r)}))) {
      return shutdown(1);
    }
  }

  // Trainers exit when training ends: then the cluster's work is done. (A
  // trainer that crashed is restarted, one that refused to go on stops the
  // cluster: supervise() sees to both.)
  auto trainers_finished = [&]() -> std::optional<int> {
    if (trainers == 0) return std::nullopt;
    for (int r = 0; r < trainers; ++r) {
      if (!group.ExitedCleanly("trainer-" + std::to_string(r))) {
        return std::nullopt;
      }
    }
    return 0;
  };
  // Restarts members that crashed, after their backoff; nullopt while the
  // cluster can go on, else the exit code to stop with (a member that
  // refused to go on, or one restarted --max-restarts times).
  auto supervise = [&]() -> std::optional<int> {
    const auto now = std::chrono::steady_clock::now();
    for (auto& [name, s] : supervised) {
      if (group.IsRunning(name) || group.ExitedCleanly(name)) continue;
      const bool is_worker = name.rfind("worker-", 0) == 0;
      if (!group.KilledBySignal(name) && !is_worker) {
        std::cerr << "[up] " << name
                  << " exited with an error: it refused to go on (its log "
                     "says why)\n";
        return 1;
      }
      if (!s.restart_at) {
        if (s.restarts >= max_restarts) {
          std::cerr << "[up] " << name << " failed again after " << s.restarts
                    << " restarts (--max-restarts); stopping\n";
          return 1;
        }
        if (now - s.started >= std::chrono::seconds(30)) s.backoff = Ms(200);
        s.restart_at = now + s.backoff;
        std::cout << "[up] restarting " << name << " in " << s.backoff.count()
                  << " ms (restart " << s.restarts + 1 << ")\n"
                  << std::flush;
        s.backoff = std::min(Ms(5000), s.backoff * 2);
      } else if (now >= *s.restart_at) {
        s.restart_at.reset();
        ++s.restarts;
        auto pid = group.Spawn(name, s.args);
        if (!pid.ok()) {
          std::cerr << "[up] cannot restart " << name << ": "
                    << pid.status().message() << "\n";
          return 1;
        }
        s.started = now;
      }
    }
    return std::nullopt;
  };

  // 3. Wait until everyone has joined, then show the cluster.
  auto coordinator = ParseHostPort(address);
  const auto ready_deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(ready_timeout_s);
  Status last = UnavailableError("no answer yet");
  while (true) {
    auto status = FetchStatus(*coordinator, *secret, Ms(2000));
    if (status.ok() && ClusterReady(*status, workers, trainers)) {
      std::cout << "[up] cluster ready\n"
                << FormatStatus(*status) << std::flush;
      break;
    }
    if (status.ok() && !status->placement_error().empty() &&
        AllWorkersAlive(*status, workers)) {
      // Every worker is here and the model still does not fit (workers
      // started with other capacities): it never will.
      std::cerr << "[up] the cluster cannot hold the model: "
                << status->placement_error() << "\n";
      return shutdown(1);
    }
    last = status.ok() ? DeadlineExceededError("not every member has joined")
                       : status.status();
    print_events();
    if (auto code = trainers_finished()) {
      std::cout << "[up] every trainer has exited\n";
      return shutdown(*code);
    }
    if (auto code = supervise()) return shutdown(*code);
    if (std::chrono::steady_clock::now() > ready_deadline) {
      std::cerr << "[up] cluster not ready within " << ready_timeout_s
                << " s: " << last.ToString() << "\n";
      return shutdown(1);
    }
    if (stop_requested(Ms(200))) return shutdown(130);
  }

  // 4. Run until Ctrl-C, SIGTERM, --duration-s, or every child has exited.
  const auto end =
      std::chrono::steady_clock::now() + std::chrono::seconds(duration_s);
  while (true) {
    if (stop_requested(Ms(200))) return shutdown(0);
    print_events();
    if (auto code = trainers_finished()) {
      std::cout << "[up] every trainer has exited: training done\n";
      return shutdown(*code);
    }
    if (auto code = supervise()) return shutdown(*code);
    if (group.num_running() == 0) {
      std::cout << "[up] every process has exited\n";
      return 1;
    }
    if (duration_s > 0 && std::chrono::steady_clock::now() >= end) {
      return shutdown(0);
    }
  }
}

}  // namespace switchyard::cli
