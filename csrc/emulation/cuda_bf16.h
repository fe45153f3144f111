// Stand-in for <cuda_bf16.h> in emulated (CPU) builds; see docs/EMULATION.md.
#pragma once
#include "emu.h"
