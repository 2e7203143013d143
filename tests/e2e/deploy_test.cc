// deploy/: the systemd units and the Kubernetes manifests run a cluster.
// Each test reads the files as they are, runs every process they describe
// (the coordinator, the workers, the trainers) on loopback with exactly
// their command lines, and trains a few steps. What only a real host or a
// real Kubernetes cluster provides is stood in for, and only that: paths
// that volumes or systemd's state directory provide become directories of
// the test, the coordinator's service name becomes "localhost" (still a
// name to resolve), fixed ports become free ones, and %i, ${VAR} and $(VAR)
// are expanded as systemd and Kubernetes expand them. The units run the
// binary that `cmake --install` puts under their prefix.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing/files.h"
#include "tests/testing/processes.h"
#include "tests/testing/run_command.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using Ms = std::chrono::milliseconds;

const std::string kSource = SWITCHYARD_SOURCE_DIR;

std::string ReplaceAll(std::string text, const std::string& from,
                       const std::string& to) {
  for (size_t at = text.find(from); at != std::string::npos;
       at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

// A port free now, below the kernel's ephemeral range
// (net.ipv4.ip_local_port_range starts at 32768): a port the kernel handed
// out for bind(0) and this function gave back could be handed to another
// process (a parallel test's UCX listener) before the coordinator binds it,
// which then refuses every connection (seen once in CI).
uint16_t FreePort() {
  std::mt19937 pick(
      static_cast<uint32_t>(::getpid()) * 2654435761u ^
      static_cast<uint32_t>(
          std::chrono::steady_clock::now().time_since_epoch().count()));
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const uint16_t port = static_cast<uint16_t>(20000 + pick() % 12000);
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    const bool free =
        ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    ::close(fd);
    if (free) return port;
  }
  return 0;
}

// `text` with every match of `variable` (whose group 1 is a name)
// replaced by that name's value in `values`; an unknown name fails the
// test (`what` says where it was looked up) and becomes "".
std::string ExpandVariables(std::string text, const std::regex& variable,
                            const std::map<std::string, std::string>& values,
                            const std::string& what) {
  std::smatch m;
  while (std::regex_search(text, m, variable)) {
    const auto it = values.find(m[1]);
    EXPECT_NE(it, values.end()) << m[0] << " is not set in " << what;
    text.replace(m.position(0), m.length(0),
                 it == values.end() ? std::string() : it->second);
  }
  return text;
}

void WriteFile(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path) << text;
}

// The processes of one simulated cluster, stopped at the end.
class Cluster {
 public:
  explicit Cluster(std::string dir) : dir_(std::move(dir)) {}
  ~Cluster() {
    for (auto& p : procs_) testing::StopAndReap(p.pid);
  }

  // `binary` replaces args[0] (the path the unit or manifest names). A
  // process that `finishes` (a trainer) may exit on its own; the others
  // must run until they are stopped.
  void Start(const std::string& name, const std::string& binary,
             std::vector<std::string> args, bool finishes = false) {
    args[0] = binary;
    const std::string log = dir_ + "/" + name + ".log";
    procs_.push_back({name, testing::Spawn(args, log), finishes, -1});
  }

  // Waits for `name` to exit and returns its exit code: -1 when it is still
  // running at the timeout or died of a signal. Returns early, failing the
  // test with that process's log, when a process that must keep running
  // exits (a command line the program refuses ends at once).
  int WaitExit(const std::string& name, Ms timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      for (auto& p : procs_) {
        if (p.pid > 0) {
          if (!Reap(p, Ms(0))) continue;
          if (!p.finishes) {
            ADD_FAILURE() << p.name << " exited (" << p.exit_code
                          << ") while waiting for " << name << ":\n"
                          << Log(p.name);
            return -1;
          }
        }
        if (p.name == name && p.pid <= 0) return p.exit_code;
      }
      std::this_thread::sleep_for(Ms(50));
    }
    return -1;
  }

  // SIGTERM to every process still running, trainers' side first; each
  // must leave cleanly (exit 0) within 20 s.
  void StopAllExpectingCleanExits() {
    for (auto it = procs_.rbegin(); it != procs_.rend(); ++it) {
      if (it->pid <= 0) continue;
      ::kill(it->pid, SIGTERM);
      const bool exited = Reap(*it, Ms(20000));
      EXPECT_TRUE(exited && it->exit_code == 0)
          << it->name << " did not exit cleanly on SIGTERM\n"
          << Log(it->name);
      if (!exited) testing::StopAndReap(it->pid);  // SIGKILL after 10 s.
      it->pid = -1;
    }
  }

  std::string Log(const std::string& name) const {
    return testing::ReadFile(dir_ + "/" + name + ".log");
  }
  // Waits until `name`'s log holds `text`.
  bool WaitLog(const std::string& name, const std::string& text,
               Ms timeout = Ms(120000)) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (Log(name).find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(Ms(20));
    }
    return false;
  }
  // SIGTERM to `name` (systemctl stop); its exit code within `timeout`
  // (-1: it did not exit, and is killed).
  int Stop(const std::string& name, Ms timeout) {
    for (auto& p : procs_) {
      if (p.name != name || p.pid <= 0) continue;
      ::kill(p.pid, SIGTERM);
      if (!Reap(p, timeout)) {
        testing::StopAndReap(p.pid);
        p.pid = -1;
        return -1;
      }
      return p.exit_code;
    }
    return -1;
  }

 private:
  struct Proc {
    std::string name;
    pid_t pid;  // -1 once reaped.
    bool finishes;
    int exit_code;  // Once reaped: its exit code, -1 for a signal.
  };

  // Whether `p` exited within `timeout` (0: has exited already); reaps it.
  static bool Reap(Proc& p, Ms timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      int status = 0;
      if (::waitpid(p.pid, &status, WNOHANG) == p.pid) {
        p.pid = -1;
        p.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        return true;
      }
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(Ms(50));
    }
  }
  std::string dir_;
  std::vector<Proc> procs_;
};

class DeployTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/switchyard_deploy_" +
           std::to_string(::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    fs::create_directories(dir_ + "/corpus");
    testing::WriteTwoLanguageCorpus(dir_ + "/corpus");
    secret_ = std::string(48, 'k') + std::to_string(::getpid());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string dir_, secret_;
};

// ---- systemd ----

// KEY=VALUE lines of an EnvironmentFile.
std::map<std::string, std::string> ReadEnvironmentFile(
    const std::string& path) {
  std::map<std::string, std::string> env;
  std::istringstream in(testing::ReadFile(path));
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t eq = line.find('=');
    if (eq != std::string::npos) env[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return env;
}

// A unit file's settings (continued lines joined), by key.
std::map<std::string, std::string> ReadUnit(const std::string& path) {
  std::map<std::string, std::string> settings;
  std::istringstream in(testing::ReadFile(path));
  std::string line, pending;
  while (std::getline(in, line)) {
    if (pending.empty() && (line.empty() || line[0] == '#' || line[0] == '['))
      continue;
    if (!line.empty() && line.back() == '\\') {
      pending += line.substr(0, line.size() - 1);
      continue;
    }
    line = pending + line;
    pending.clear();
    const size_t eq = line.find('=');
    if (eq != std::string::npos) {
      settings[line.substr(0, eq)] = line.substr(eq + 1);
    }
  }
  return settings;
}

// ExecStart= as systemd runs it: %i and %S specifiers, ${VAR} from the
// environment file, split into words.
std::vector<std::string> ExecStartArgs(
    const std::string& exec_start, const std::string& instance,
    const std::string& state_root,
    const std::map<std::string, std::string>& env) {
  static const std::regex kVar(R"(\$\{([A-Z_]+)\})");
  std::string line = ReplaceAll(exec_start, "%i", instance);
  line = ExpandVariables(ReplaceAll(line, "%S", state_root), kVar, env,
                         "switchyard.env");
  std::vector<std::string> args;
  std::istringstream words(line);
  for (std::string w; words >> w;) args.push_back(w);
  return args;
}

TEST_F(DeployTest, SystemdUnitsRunACluster) {
  const std::string units = kSource + "/deploy/systemd";
  auto env = ReadEnvironmentFile(units + "/switchyard.env");
  for (const char* var :
       {"SWITCHYARD_CONFIG", "SWITCHYARD_COORDINATOR", "SWITCHYARD_SECRET_FILE",
        "SWITCHYARD_DATA_HOST", "SWITCHYARD_DATA"}) {
    ASSERT_EQ(env.count(var), 1u) << var << " is missing from switchyard.env";
  }
  // This host's values for the variables the example file documents.
  YAML::Node config = YAML::LoadFile(kSource + "/examples/tiny.yaml");
  config["training"]["steps"] = 300;
  config["training"]["log_every"] = 5;
  config["training"]["threads"] = 1;
  WriteFile(dir_ + "/etc/run.yaml", YAML::Dump(config));
  WriteFile(dir_ + "/etc/secret", secret_);
  env["SWITCHYARD_CONFIG"] = dir_ + "/etc/run.yaml";
  env["SWITCHYARD_COORDINATOR"] = "localhost:" + std::to_string(FreePort());
  env["SWITCHYARD_SECRET_FILE"] = dir_ + "/etc/secret";
  env["SWITCHYARD_DATA_HOST"] = "127.0.0.1";
  env["SWITCHYARD_DATA"] = dir_ + "/corpus";
  const std::string state_root = dir_ + "/var/lib";
  // As deploy/README.md says: `cmake --install` into the units' prefix.
  const std::string prefix = dir_ + "/usr/local";
  ASSERT_EQ(std::system((std::string(SWITCHYARD_CMAKE) + " --install " +
                         SWITCHYARD_BUILD_DIR + " --prefix " + prefix + " > " +
                         dir_ + "/install.log 2>&1")
                            .c_str()),
            0)
      << testing::ReadFile(dir_ + "/install.log");
  ASSERT_TRUE(fs::exists(prefix + "/share/doc/switchyard/operations.md"));

  Cluster cluster(dir_);
  auto start = [&](const std::string& unit, const std::string& instance,
                   const std::string& name, bool finishes = false) {
    auto settings = ReadUnit(units + "/" + unit);
    ASSERT_EQ(settings["EnvironmentFile"], "/etc/switchyard/switchyard.env");
    ASSERT_EQ(settings["StateDirectory"], "switchyard");
    auto args = ExecStartArgs(settings["ExecStart"], instance, state_root, env);
    ASSERT_FALSE(args.empty());
    ASSERT_EQ(args[0], "/usr/local/bin/switchyard") << unit;
    cluster.Start(name, prefix + "/bin/switchyard", args, finishes);
  };
  start("switchyard-coordinator.service", "", "coordinator");
  // Stopping a worker unit drains it: TimeoutStopSec covers the longest
  // drain (2 move timeouts and 4 call timeouts, by default 140 s).
  EXPECT_GE(std::stoi(ReadUnit(
                units + "/switchyard-worker@.service")["TimeoutStopSec"]),
            140);
  const int workers = config["cluster"]["workers"].as<int>();
  const int trainers = config["cluster"]["trainers"].as<int>();
  for (int w = 0; w < workers; ++w) {
    const std::string name = "worker-" + std::to_string(w);
    start("switchyard-worker@.service", name, name);
  }
  for (int r = 0; r < trainers; ++r) {
    start("switchyard-trainer@.service", std::to_string(r),
          "trainer-" + std::to_string(r), /*finishes=*/true);
  }
  // `systemctl start` of one more worker instance during the run is a
  // join, `systemctl stop` of it a drain: both move shards live.
  const std::string extra = "worker-" + std::to_string(workers);
  ASSERT_TRUE(cluster.WaitLog("trainer-0", "step 10/"))
      << cluster.Log("trainer-0");
  start("switchyard-worker@.service", extra, extra, /*finishes=*/true);
  ASSERT_TRUE(cluster.WaitLog(extra, "took over")) << cluster.Log(extra);
  EXPECT_EQ(cluster.Stop(extra, Ms(100000)), 0) << cluster.Log(extra);
  EXPECT_NE(cluster.Log(extra).find(extra + ": drained"), std::string::npos)
      << cluster.Log(extra);
  for (int r = 0; r < trainers; ++r) {
    const std::string name = "trainer-" + std::to_string(r);
    ASSERT_EQ(cluster.WaitExit(name, Ms(180000)), 0)
        << cluster.Log(name) << "\n--- coordinator:\n"
        << cluster.Log("coordinator");
  }
  EXPECT_NE(cluster.Log("trainer-0").find("step 300/300 loss"),
            std::string::npos)
      << cluster.Log("trainer-0");
  // Nothing rolled back: each move continued from a step boundary.
  for (const char* rollback :
       {"(the newest committed checkpoint)", "(nothing committed yet)"}) {
    EXPECT_EQ(cluster.Log("coordinator").find(rollback), std::string::npos)
        << cluster.Log("coordinator");
  }
  EXPECT_NE(cluster.Log("trainer-0").find("after a pause of"),
            std::string::npos)
      << cluster.Log("trainer-0");
  cluster.StopAllExpectingCleanExits();
  // Everything stateful is under the state directory systemd provides.
  EXPECT_TRUE(fs::exists(state_root + "/switchyard/coordinator"));
}

// systemd's own parser accepts the units: `systemd-analyze verify` reports
// nothing but the binary, which is not installed in /usr/local/bin here.
TEST_F(DeployTest, SystemdAcceptsTheUnits) {
  if (std::system("command -v systemd-analyze > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "systemd-analyze is not installed";
  }
  const std::string units = kSource + "/deploy/systemd";
  std::string files;
  for (const auto& [unit, instance] :
       std::vector<std::pair<std::string, std::string>>{
           {"switchyard-coordinator.service", "switchyard-coordinator.service"},
           {"switchyard-worker@.service", "switchyard-worker@worker-0.service"},
           {"switchyard-trainer@.service", "switchyard-trainer@0.service"}}) {
    fs::copy_file(units + "/" + unit, dir_ + "/" + instance);
    files += " " + dir_ + "/" + instance;
  }
  const std::string log = dir_ + "/verify.log";
  (void)std::system(
      ("timeout 60 systemd-analyze verify" + files + " > " + log + " 2>&1")
          .c_str());
  std::istringstream out(testing::ReadFile(log));
  int lines = 0;
  for (std::string line; std::getline(out, line);) {
    if (line.empty()) continue;
    ++lines;
    EXPECT_NE(line.find("/usr/local/bin/switchyard is not executable"),
              std::string::npos)
        << line;
  }
  EXPECT_LE(lines, 3) << testing::ReadFile(log);
}

// ---- Kubernetes ----

const YAML::Node* FindKind(const std::vector<YAML::Node>& docs,
                           const std::string& kind, const std::string& name) {
  for (const auto& d : docs) {
    if (d["kind"].as<std::string>() == kind &&
        d["metadata"]["name"].as<std::string>() == name) {
      return &d;
    }
  }
  return nullptr;
}

// One pod of a workload as a local process: its command with $(VAR)
// expanded from its env (fieldRefs answered as Kubernetes would for `pod`,
// plus what the controller injects, passed in `env`), each volume's
// mountPath mapped to a directory of the pod, the coordinator service and
// fixed ports mapped.
struct PodRunner {
  std::string dir;                             // The test's directory.
  std::map<std::string, std::string> replace;  // Service names, ports.
  std::string run_yaml;                        // The ConfigMap's file.
  std::string secret;

  std::vector<std::string> Args(const YAML::Node& pod_spec,
                                const std::string& pod,
                                std::map<std::string, std::string> env) {
    const YAML::Node container = pod_spec["containers"][0];
    const std::map<std::string, std::string> fields = {
        {"metadata.name", pod}, {"status.podIP", "127.0.0.1"}};
    for (const auto& e : container["env"]) {
      const std::string name = e["name"].as<std::string>();
      if (e["value"]) {
        env[name] = e["value"].as<std::string>();
      } else {
        const std::string field =
            e["valueFrom"]["fieldRef"]["fieldPath"].as<std::string>();
        EXPECT_EQ(fields.count(field), 1u) << field;
        env[name] = fields.count(field) ? fields.at(field) : "";
      }
    }
    // Volumes: where each mount's contents live for this pod.
    std::map<std::string, std::string> volume_kind;
    for (const auto& v : pod_spec["volumes"]) {
      volume_kind[v["name"].as<std::string>()] = v["configMap"] ? "config"
                                                 : v["secret"]  ? "secret"
                                                 : v["persistentVolumeClaim"]
                                                     ? "corpus"
                                                     : "other";
    }
    std::vector<std::pair<std::string, std::string>> mounts;
    for (const auto& m : container["volumeMounts"]) {
      const std::string name = m["name"].as<std::string>();
      const std::string path = m["mountPath"].as<std::string>();
      const std::string kind =
          volume_kind.count(name) ? volume_kind[name] : "claim";
      // A claim from volumeClaimTemplates is the pod's own volume.
      const std::string local =
          kind == "corpus" ? dir + "/corpus" : dir + "/" + pod + "/" + name;
      mounts.push_back({path, local});
      fs::create_directories(local);
      if (kind == "secret") WriteFile(local + "/secret", secret);
    }
    pod_mounts[pod] = mounts;
    auto map_text = [&](const std::string& text) { return Map(pod, text); };
    for (const auto& [path, local] : mounts) {
      if (path == "/etc/switchyard/config") {
        WriteFile(local + "/run.yaml", map_text(run_yaml));
      }
    }
    // The image installs the command on the PATH (deploy/docker).
    EXPECT_EQ(container["command"][0].as<std::string>(), "switchyard");
    std::vector<std::string> args;
    static const std::regex kVar(R"(\$\(([A-Z_]+)\))");
    for (const auto& word : container["command"]) {
      args.push_back(map_text(
          ExpandVariables(word.as<std::string>(), kVar, env, "the pod's env")));
    }
    return args;
  }

  // `text` with the services, ports and `pod`'s mounts mapped.
  std::string Map(const std::string& pod, std::string text) const {
    for (const auto& [from, to] : replace) text = ReplaceAll(text, from, to);
    if (pod_mounts.count(pod)) {
      for (const auto& [path, local] : pod_mounts.at(pod)) {
        text = ReplaceAll(text, path, local);
      }
    }
    return text;
  }

  // The container's preStop hook (`sh -c SCRIPT`) as a shell command line
  // for `pod`, run after Args: its env, mounts and the binary mapped.
  std::string PreStop(const YAML::Node& pod_spec, const std::string& pod) {
    const YAML::Node command =
        pod_spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"];
    EXPECT_EQ(command.size(), 3u);
    EXPECT_EQ(command[0].as<std::string>(), "sh");
    EXPECT_EQ(command[1].as<std::string>(), "-c");
    std::string script = Map(pod, command[2].as<std::string>());
    EXPECT_EQ(script.rfind("switchyard ", 0), 0u) << script;
    script = std::string(SWITCHYARD_BINARY) + script.substr(10);
    return "env POD_NAME=" + pod + " sh -c '" + script + "'";
  }

  std::map<std::string, std::vector<std::pair<std::string, std::string>>>
      pod_mounts;
};

TEST_F(DeployTest, KubernetesManifestsRunACluster) {
  std::vector<YAML::Node> docs =
      YAML::LoadAllFromFile(kSource + "/deploy/k8s/switchyard.yaml");
  for (const YAML::Node& d :
       YAML::LoadAllFromFile(kSource + "/deploy/k8s/trainers.yaml")) {
    docs.push_back(d);
  }
  const YAML::Node* config_map =
      FindKind(docs, "ConfigMap", "switchyard-config");
  const YAML::Node* coordinator =
      FindKind(docs, "StatefulSet", "switchyard-coordinator");
  const YAML::Node* service =
      FindKind(docs, "Service", "switchyard-coordinator");
  const YAML::Node* worker = FindKind(docs, "StatefulSet", "switchyard-worker");
  const YAML::Node* trainer = FindKind(docs, "Job", "switchyard-trainer");
  ASSERT_TRUE(config_map && coordinator && service && worker && trainer);

  // The run's configuration agrees with the workloads' sizes.
  YAML::Node config =
      YAML::Load((*config_map)["data"]["run.yaml"].as<std::string>());
  const int workers = config["cluster"]["workers"].as<int>();
  const int trainers = config["cluster"]["trainers"].as<int>();
  EXPECT_EQ((*worker)["spec"]["replicas"].as<int>(), workers);
  EXPECT_EQ((*trainer)["spec"]["completions"].as<int>(), trainers);
  EXPECT_EQ((*trainer)["spec"]["parallelism"].as<int>(), trainers);
  EXPECT_EQ((*trainer)["spec"]["completionMode"].as<std::string>(), "Indexed");
  EXPECT_EQ(config["cluster"]["coordinator_address"].as<std::string>(),
            "switchyard-coordinator:" +
                (*service)["spec"]["ports"][0]["port"].as<std::string>());

  // Pods run as the image's user, which can write the volumes and read
  // the secret (group-readable, fsGroup).
  const std::string dockerfile =
      testing::ReadFile(kSource + "/deploy/docker/Dockerfile");
  ASSERT_NE(dockerfile.find("--uid 10001 --gid 10001"), std::string::npos);
  for (const YAML::Node* workload : {coordinator, worker, trainer}) {
    const YAML::Node pod = (*workload)["spec"]["template"]["spec"];
    const std::string name = (*workload)["metadata"]["name"].as<std::string>();
    EXPECT_EQ(pod["securityContext"]["runAsUser"].as<int>(), 10001) << name;
    EXPECT_EQ(pod["securityContext"]["fsGroup"].as<int>(), 10001) << name;
    for (const auto& v : pod["volumes"]) {
      if (v["secret"]) {
        EXPECT_EQ(v["secret"]["defaultMode"].as<std::string>(), "0440") << name;
      }
    }
  }

  // A few dozen steps of the same model.
  config["training"]["steps"] = 60;
  config["training"]["log_every"] = 5;
  config["training"]["threads"] = 1;
  PodRunner runner;
  runner.dir = dir_;
  runner.run_yaml = YAML::Dump(config);
  runner.secret = secret_;
  runner.replace = {
      {"switchyard-coordinator:", "localhost:"},
      {":7470", ":" + std::to_string(FreePort())},
      {":9464", ":0"},
  };

  Cluster cluster(dir_);
  cluster.Start("coordinator", SWITCHYARD_BINARY,
                runner.Args((*coordinator)["spec"]["template"]["spec"],
                            "switchyard-coordinator-0", {}));
  for (int w = 0; w < workers; ++w) {
    const std::string pod = "switchyard-worker-" + std::to_string(w);
    cluster.Start(pod, SWITCHYARD_BINARY,
                  runner.Args((*worker)["spec"]["template"]["spec"], pod, {}));
  }
  for (int r = 0; r < trainers; ++r) {
    const std::string pod = "switchyard-trainer-" + std::to_string(r);
    cluster.Start(pod, SWITCHYARD_BINARY,
                  runner.Args((*trainer)["spec"]["template"]["spec"], pod,
                              {{"JOB_COMPLETION_INDEX", std::to_string(r)}}),
                  /*finishes=*/true);
  }
  // Scaling the StatefulSet up during the run starts one more pod (a
  // join); scaling it down runs that pod's preStop hook (a drain), after
  // which its worker has left (exit 0) and the run goes on.
  const std::string extra = "switchyard-worker-" + std::to_string(workers);
  const YAML::Node worker_pod = (*worker)["spec"]["template"]["spec"];
  // The grace period covers the longest drain: 2 move timeouts and 4 call
  // timeouts (defaults 60 s and 5 s) before the worker leaves anyway.
  auto ms = [&](const char* field, int default_ms) {
    return config["cluster"][field] ? config["cluster"][field].as<int>()
                                    : default_ms;
  };
  EXPECT_GE(worker_pod["terminationGracePeriodSeconds"].as<int>() * 1000,
            2 * ms("move_timeout_ms", 60000) + 4 * ms("call_timeout_ms", 5000));
  ASSERT_TRUE(cluster.WaitLog("switchyard-trainer-0", "step 10/"))
      << cluster.Log("switchyard-trainer-0");
  cluster.Start(extra, SWITCHYARD_BINARY, runner.Args(worker_pod, extra, {}),
                /*finishes=*/true);
  ASSERT_TRUE(cluster.WaitLog(extra, "took over")) << cluster.Log(extra);
  const auto pre_stop =
      testing::RunCommand(runner.PreStop(worker_pod, extra), 110);
  EXPECT_EQ(pre_stop.exit_code, 0) << pre_stop.output;
  EXPECT_NE(pre_stop.output.find(extra + " drained and left"),
            std::string::npos)
      << pre_stop.output;
  EXPECT_EQ(cluster.WaitExit(extra, Ms(30000)), 0) << cluster.Log(extra);
  for (int r = 0; r < trainers; ++r) {
    const std::string pod = "switchyard-trainer-" + std::to_string(r);
    ASSERT_EQ(cluster.WaitExit(pod, Ms(180000)), 0)
        << cluster.Log(pod) << "\n--- coordinator:\n"
        << cluster.Log("coordinator");
  }
  EXPECT_NE(cluster.Log("switchyard-trainer-0").find("step 60/60 loss"),
            std::string::npos)
      << cluster.Log("switchyard-trainer-0");
  for (const char* rollback :
       {"(the newest committed checkpoint)", "(nothing committed yet)"}) {
    EXPECT_EQ(cluster.Log("coordinator").find(rollback), std::string::npos)
        << cluster.Log("coordinator");
  }
  // Workers registered under their pod names.
  EXPECT_NE(cluster.Log("coordinator").find("switchyard-worker-1"),
            std::string::npos)
      << cluster.Log("coordinator");
  cluster.StopAllExpectingCleanExits();
}

}  // namespace
}  // namespace switchyard
