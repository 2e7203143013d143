// Command-line flags for the switchyard subcommands.
//
// Flags are "--name value" or "--name=value"; booleans also take "--name".
// Every flag has help text, and "--help" prints all of them with defaults.
// Not thread-safe; used once at start-up.
#ifndef SWITCHYARD_COMMON_FLAGS_H_
#define SWITCHYARD_COMMON_FLAGS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace switchyard {

class FlagParser {
 public:
  // `usage` is the synopsis line, `summary` what the command does.
  FlagParser(std::string usage, std::string summary);

  // Targets keep their current value as the default and must outlive Parse.
  void AddString(const std::string& name, std::string* target,
                 const std::string& help);
  void AddInt(const std::string& name, int64_t* target,
              const std::string& help);
  void AddBool(const std::string& name, bool* target, const std::string& help);
  // May be given several times; each occurrence appends.
  void AddRepeated(const std::string& name, std::vector<std::string>* target,
                   const std::string& help);

  // Parses argv[first..argc). Unknown flags and bad values are errors naming
  // the flag. Sets help_requested() on --help / -h.
  Status Parse(int argc, char** argv, int first);

  bool help_requested() const { return help_requested_; }
  const std::vector<std::string>& positional() const { return positional_; }
  std::string Help() const;

 private:
  enum class Type { kString, kInt, kBool, kRepeated };
  struct Flag {
    std::string name;
    Type type;
    void* target;
    std::string help;
    std::string default_text;
  };
  Status Assign(const Flag& flag, const std::string& value);

  std::string usage_;
  std::string summary_;
  std::vector<Flag> flags_;
  std::vector<std::string> positional_;
  bool help_requested_ = false;
};

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_FLAGS_H_
