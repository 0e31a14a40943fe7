#include "lib/greet.h"

#include "gen/version.h"

std::string greet(const std::string& who) { return "hello, " + who + "!"; }

std::string version() { return GREETING_VERSION; }
