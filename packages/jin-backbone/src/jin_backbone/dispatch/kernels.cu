// Expert dispatch kernels: permutation into expert-contiguous order and the weighted top-k
// un-permutation, each with its backward. Compiled at run time by NVRTC through CuPy (RawModule);
// tests/test_cuda_sources.py compiles this file to PTX on machines without a GPU.
//
// Shapes: N tokens, K top-k, M expert-sorted rows, D width. Index tensors are int64; a row index
// of -1 marks an assignment dropped by the capacity limit. Arithmetic accumulates in fp32.
// bf16 is handled as raw 16-bit storage so that no CUDA toolkit header is needed.

struct bf16 {
  unsigned short bits;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) {
  unsigned int u = __float_as_uint(v);
  bf16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    out.bits = 0x7fc0;
    return out;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (as torch does)
  out.bits = static_cast<unsigned short>(u >> 16);
  return out;
}

// out[m, :] = x[source[m], :]. A pure row copy, so it is typed by its copy unit U (uint4 moves
// 16 bytes per thread; the host picks the widest unit that divides the row and the alignment).
// One block per row, grid-strided.
template <typename U>
__global__ void gather_rows(const U* __restrict__ x, const long long* __restrict__ source,
                            U* __restrict__ out, long long num_rows, long long row_units) {
  for (long long m = blockIdx.x; m < num_rows; m += gridDim.x) {
    const U* src = x + source[m] * row_units;
    U* dst = out + m * row_units;
    for (long long j = threadIdx.x; j < row_units; j += blockDim.x) dst[j] = src[j];
  }
}

// Backward of the permutation: grad_x[n, :] = sum_k grad_sorted[row[k, n], :] over kept rows.
// A gather per token (each output row written once), so no atomics and a deterministic result.
template <typename T>
__global__ void permute_backward(const T* __restrict__ grad_sorted,
                                 const long long* __restrict__ row_of_assignment,
                                 T* __restrict__ grad_x, long long num_tokens, long long top_k,
                                 long long dim) {
  for (long long n = blockIdx.x; n < num_tokens; n += gridDim.x) {
    for (long long d = threadIdx.x; d < dim; d += blockDim.x) {
      float acc = 0.f;
      for (long long k = 0; k < top_k; ++k) {
        const long long r = row_of_assignment[k * num_tokens + n];
        if (r >= 0) acc += to_float(grad_sorted[r * dim + d]);
      }
      grad_x[n * dim + d] = from_float<T>(acc);
    }
  }
}

// out[n, :] = sum_k weights[n, k] * y[row[k, n], :]; weights are fp32.
template <typename T>
__global__ void unpermute_combine(const T* __restrict__ y, const float* __restrict__ weights,
                                  const long long* __restrict__ row_of_assignment,
                                  T* __restrict__ out, long long num_tokens, long long top_k,
                                  long long dim) {
  for (long long n = blockIdx.x; n < num_tokens; n += gridDim.x) {
    for (long long d = threadIdx.x; d < dim; d += blockDim.x) {
      float acc = 0.f;
      for (long long k = 0; k < top_k; ++k) {
        const long long r = row_of_assignment[k * num_tokens + n];
        if (r >= 0) acc += weights[n * top_k + k] * to_float(y[r * dim + d]);
      }
      out[n * dim + d] = from_float<T>(acc);
    }
  }
}

// Backward of the combine, one block per assignment a = k * N + n with kept row r:
//   grad_y[r, :] = weights[n, k] * grad_out[n, :]      (every kept row written exactly once)
//   grad_weights[n, k] = <grad_out[n, :], y[r, :]>      (block reduction; 0 when dropped)
// blockDim.x must be a power of two no larger than 1024.
template <typename T>
__global__ void unpermute_combine_backward(const T* __restrict__ grad_out,
                                           const T* __restrict__ y,
                                           const float* __restrict__ weights,
                                           const long long* __restrict__ row_of_assignment,
                                           T* __restrict__ grad_y,
                                           float* __restrict__ grad_weights,
                                           long long num_tokens, long long top_k, long long dim) {
  __shared__ float partial[1024];
  const long long num_assignments = num_tokens * top_k;
  for (long long a = blockIdx.x; a < num_assignments; a += gridDim.x) {
    const long long k = a / num_tokens;
    const long long n = a - k * num_tokens;
    const long long r = row_of_assignment[a];
    float dot = 0.f;
    if (r >= 0) {
      const float w = weights[n * top_k + k];
      for (long long d = threadIdx.x; d < dim; d += blockDim.x) {
        const float g = to_float(grad_out[n * dim + d]);
        grad_y[r * dim + d] = from_float<T>(w * g);
        dot += g * to_float(y[r * dim + d]);
      }
    }
    partial[threadIdx.x] = dot;
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) grad_weights[n * top_k + k] = partial[0];
    __syncthreads();  // partial[] is reused by this block's next assignment
  }
}
