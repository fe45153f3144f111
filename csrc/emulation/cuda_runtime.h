// Stand-in for <cuda_runtime.h> in emulated (CPU) builds; see docs/EMULATION.md.
#pragma once
#include "emu.h"
