// The switchyard subcommands. Each returns the process exit code:
// 0 success, 1 runtime failure, 2 bad usage or configuration.
#ifndef SWITCHYARD_CLI_COMMANDS_H_
#define SWITCHYARD_CLI_COMMANDS_H_

namespace switchyard::cli {

int CoordinatorCommand(int argc, char** argv);
int WorkerCommand(int argc, char** argv);
int TrainCommand(int argc, char** argv);
int UpCommand(int argc, char** argv);
int StatusCommand(int argc, char** argv);
int DrainCommand(int argc, char** argv);
int CkptCommand(int argc, char** argv);

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_COMMANDS_H_
