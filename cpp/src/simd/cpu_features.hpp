#pragma once

namespace normlab {

// True when this CPU (and OS) can run code built for the named target.
bool cpu_supports_target(const char* name);

}  // namespace normlab
