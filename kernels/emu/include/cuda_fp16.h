// cuda_fp16.h for arqon-kernels-emu: the types live in emu.h.
#pragma once
#include "emu.h"
