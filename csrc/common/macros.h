// Shared by the C++ CPU and CUDA kernels: the same inline math compiles for host and device.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GENFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GENFAST_HOST_DEVICE inline
#endif
