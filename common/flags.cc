#include "common/flags.h"

#include <cerrno>
#include <cstdlib>
#include <sstream>

namespace switchyard {

FlagParser::FlagParser(std::string usage, std::string summary)
    : usage_(std::move(usage)), summary_(std::move(summary)) {}

void FlagParser::AddString(const std::string& name, std::string* target,
                           const std::string& help) {
  flags_.push_back({name, Type::kString, target, help,
                    target->empty() ? "" : "\"" + *target + "\""});
}

void FlagParser::AddInt(const std::string& name, int64_t* target,
                        const std::string& help) {
  flags_.push_back({name, Type::kInt, target, help, std::to_string(*target)});
}

void FlagParser::AddBool(const std::string& name, bool* target,
                         const std::string& help) {
  flags_.push_back(
      {name, Type::kBool, target, help, *target ? "true" : "false"});
}

void FlagParser::AddRepeated(const std::string& name,
                             std::vector<std::string>* target,
                             const std::string& help) {
  flags_.push_back({name, Type::kRepeated, target, help, ""});
}

Status FlagParser::Assign(const Flag& flag, const std::string& value) {
  switch (flag.type) {
    case Type::kString:
      *static_cast<std::string*>(flag.target) = value;
      return OkStatus();
    case Type::kRepeated:
      static_cast<std::vector<std::string>*>(flag.target)->push_back(value);
      return OkStatus();
    case Type::kBool:
      if (value != "true" && value != "false") {
        return InvalidArgumentError("--" + flag.name + ": '" + value +
                                    "' is not true or false");
      }
      *static_cast<bool*>(flag.target) = value == "true";
      return OkStatus();
    case Type::kInt: {
      errno = 0;
      char* end = nullptr;
      const long long v = std::strtoll(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || errno == ERANGE) {
        return InvalidArgumentError("--" + flag.name + ": '" + value +
                                    "' is not an integer");
      }
      *static_cast<int64_t*>(flag.target) = v;
      return OkStatus();
    }
  }
  return InternalError("unreachable flag type");
}

Status FlagParser::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0 || arg == "--") {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Flag* flag = nullptr;
    for (const Flag& f : flags_) {
      if (f.name == name) flag = &f;
    }
    if (flag == nullptr) {
      return InvalidArgumentError("unknown flag --" + name + " (see --help)");
    }
    if (!has_value) {
      if (flag->type == Type::kBool) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return InvalidArgumentError("--" + name + " needs a value");
      }
    }
    RETURN_IF_ERROR(Assign(*flag, value));
  }
  return OkStatus();
}

std::string FlagParser::Help() const {
  std::ostringstream out;
  out << "usage: " << usage_ << "\n\n" << summary_ << "\n\nflags:\n";
  for (const Flag& f : flags_) {
    std::string left = "  --" + f.name;
    if (f.type != Type::kBool) left += " VALUE";
    out << left;
    out << std::string(left.size() < 28 ? 28 - left.size() : 1, ' ') << f.help;
    if (!f.default_text.empty()) out << " (default " << f.default_text << ")";
    if (f.type == Type::kRepeated) out << " (repeatable)";
    out << "\n";
  }
  out << "  --help                    print this help\n";
  return out.str();
}

}  // namespace switchyard
