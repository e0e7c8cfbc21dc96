#include "quant/gguf_blocks.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "quant/gguf_blocks_common.h"
#include "quant/matmul.h"
#include "quant/pool.h"
#include "quant/quant.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <stdexcept>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace mlx_harmony_core::gguf {

#if defined(MHC_HAVE_X86_KERNELS)
namespace avx2 {
const BlockIsa* get();
}
#endif

namespace {

// -- generic kernels ---------------------------------------------------------

void gemv_generic(int type,
                  const uint8_t* w,
                  int64_t row_bytes,
                  const float* const* x,
                  int nx,
                  float* const* y,
                  int64_t n0,
                  int64_t n1) {
  const int bs = block_bytes(type);
  const int64_t blocks = row_bytes / bs;
  std::vector<float> acc(nx);
  float v[32];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < blocks; ++b) {
      const float d = decode_block(type, row + b * bs, v);
      for (int r = 0; r < nx; ++r) {
        const float* xb = x[r] + b * 32;
        float s = 0.f;
        for (int j = 0; j < 32; ++j) {
          s += v[j] * xb[j];
        }
        acc[r] += d * s;
      }
    }
    for (int r = 0; r < nx; ++r) {
      y[r][n] = acc[r];
    }
  }
}

void dequant_generic(int type,
                     const uint8_t* w,
                     int64_t row_bytes,
                     int64_t r0,
                     int64_t r1,
                     float* out) {
  const int bs = block_bytes(type);
  const int64_t blocks = row_bytes / bs;
  float v[32];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < blocks; ++b, out += 32) {
      const float d = decode_block(type, w + r * row_bytes + b * bs, v);
      for (int j = 0; j < 32; ++j) {
        out[j] = v[j] * d;
      }
    }
  }
}

const BlockIsa kGeneric{"generic", gemv_generic, dequant_generic};

const BlockIsa* best() {
  if (const BlockIsa* i = block_isa_avx2()) {
    return i;
  }
  return &kGeneric;
}

std::atomic<const BlockIsa*> current{nullptr};

// -- the driver --------------------------------------------------------------

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// A dequantized tile for the BLAS: big enough for an efficient GEMM, small
// enough to stay in the last-level cache (as quant/matmul.cpp's).
constexpr int64_t kTileBytes = 4 << 20;
// Rows of one GEMV task: enough work to amortize taking it.
constexpr int64_t kMinTaskBytes = 64 << 10;

void dequant_parallel(const BlockIsa& isa,
                      int type,
                      const BlockJob& job,
                      int64_t r0,
                      int64_t r1,
                      int64_t cols,
                      float* out) {
  auto& pool = quant::Pool::instance();
  const int64_t want = int64_t(pool.threads()) * 4;
  const int64_t step = std::max<int64_t>(4, (r1 - r0 + want - 1) / want);
  const int64_t tasks = (r1 - r0 + step - 1) / step;
  pool.run(tasks, [&](int64_t t) {
    const int64_t s = r0 + t * step, e = std::min(r1, s + step);
    isa.dequant(type, job.w, job.row_bytes, s, e, out + (s - r0) * cols);
  });
}

void gemm(const BlockIsa& isa, int type, const BlockJob& job) {
  const int64_t nx = int64_t(job.x.size());
  const int64_t N = job.rows, K = job.row_bytes / block_bytes(type) * 32;
  std::vector<float> xs(nx * K);
  for (int64_t r = 0; r < nx; ++r) {
    std::memcpy(xs.data() + r * K, job.x[r], K * sizeof(float));
  }
  const int64_t tn = std::min<int64_t>(
      N, std::max<int64_t>(64, kTileBytes / (4 * std::max<int64_t>(K, 1))));
  std::vector<float> tile(tn * K), ytile(nx * tn);
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t nb = std::min(tn, N - n0);
    dequant_parallel(isa, type, job, n0, n0 + nb, K, tile.data());
    cblas_sgemm(kRowMajor,
                kNoTrans,
                kTrans,
                int(nx),
                int(nb),
                int(K),
                1.f,
                xs.data(),
                int(K),
                tile.data(),
                int(K),
                0.f,
                ytile.data(),
                int(nb));
    for (int64_t r = 0; r < nx; ++r) {
      std::memcpy(job.y[r] + n0, ytile.data() + r * nb, nb * sizeof(float));
    }
  }
}

// -- arrays ------------------------------------------------------------------

int64_t cols_of(int type, int64_t row_bytes) {
  return row_bytes / block_bytes(type) * 32;
}

void run_dense(mx::array& out,
               const mx::array& x,
               const mx::array& w,
               int type) {
  std::vector<uint8_t> xb, wb;
  const auto* xf = reinterpret_cast<const float*>(row_major(x, xb));
  const uint8_t* wp = row_major(w, wb);
  const int64_t rb = w.shape(-1), N = w.shape(0), K = cols_of(type, rb);
  const int64_t R = K ? int64_t(x.size()) / K : 0;
  float* y = out.data<float>();
  if (K == 0) {
    std::fill(y, y + out.size(), 0.f);
    return;
  }
  std::vector<BlockJob> jobs(1);
  jobs[0].w = wp;
  jobs[0].rows = N;
  jobs[0].row_bytes = rb;
  for (int64_t r = 0; r < R; ++r) {
    jobs[0].x.push_back(xf + r * K);
    jobs[0].y.push_back(y + r * N);
  }
  block_matmul(type, jobs);
}

std::vector<uint32_t> index_values(const mx::array& a) {
  std::vector<uint8_t> buf;
  const auto* p = reinterpret_cast<const uint32_t*>(row_major(a, buf));
  return std::vector<uint32_t>(p, p + a.size());
}

void run_gather(mx::array& out,
                const mx::array& x,
                const mx::array& w,
                const mx::array& lhs,
                const mx::array& rhs,
                int type) {
  float* y = out.data<float>();
  std::fill(y, y + out.size(), 0.f);
  const int64_t E = w.shape(0), N = w.shape(1), rb = w.shape(2);
  const int64_t K = cols_of(type, rb), M = x.shape(-2);
  const int64_t nx = M * K ? int64_t(x.size()) / (M * K) : 0;
  if (out.size() == 0 || K == 0) {
    return;
  }
  std::vector<uint8_t> xb, wb;
  const auto* xf = reinterpret_cast<const float*>(row_major(x, xb));
  const uint8_t* wp = row_major(w, wb);
  const auto li = index_values(lhs), ri = index_values(rhs);
  // Pairs grouped by expert: each expert's blocks are read once per call.
  std::vector<std::vector<int64_t>> by_expert(E);
  for (size_t i = 0; i < li.size(); ++i) {
    if (li[i] < uint64_t(nx) && ri[i] < uint64_t(E)) { // else zeros, as ours
      by_expert[ri[i]].push_back(int64_t(i));
    }
  }
  std::vector<BlockJob> jobs;
  for (int64_t e = 0; e < E; ++e) {
    if (by_expert[e].empty()) {
      continue;
    }
    BlockJob& job = jobs.emplace_back();
    job.w = wp + e * N * rb;
    job.rows = N;
    job.row_bytes = rb;
    for (int64_t p : by_expert[e]) {
      for (int64_t m = 0; m < M; ++m) {
        job.x.push_back(xf + (li[p] * M + m) * K);
        job.y.push_back(y + (p * M + m) * N);
      }
    }
  }
  block_matmul(type, jobs);
}

void run_dequant(mx::array& out, const mx::array& w, int type) {
  std::vector<uint8_t> wb;
  const uint8_t* wp = row_major(w, wb);
  const int64_t rb = w.shape(-1);
  const int64_t rows = rb ? int64_t(w.size()) / rb : 0;
  if (rows == 0 || rb == 0) {
    return;
  }
  BlockJob job{wp, rows, rb, {}, {}};
  dequant_parallel(
      block_isa(), type, job, 0, rows, cols_of(type, rb), out.data<float>());
}

void check_type(int type, const char* op) {
  if (!block_type_supported(type)) {
    throw std::invalid_argument(std::string("[") + op + "] GGML type " +
                                std::to_string(type) +
                                " has no block kernel (Q8_0 = 8, MXFP4 = 39)");
  }
}

mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  mx::Stream st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) {
    throw std::invalid_argument(
        std::string("[") + op +
        "] GGUF block kernels run on the CPU; on a GPU load the model "
        "repacked (MLX's quantized layout)");
  }
  return st;
}

void check_weights(const mx::array& w, int ndim, int type, const char* op) {
  if (w.dtype() != mx::uint8 || w.ndim() != ndim) {
    throw std::invalid_argument(std::string("[") + op + "] weights must be a " +
                                std::to_string(ndim) +
                                "-d uint8 array of GGUF blocks");
  }
  if (w.shape(-1) % block_bytes(type) != 0) {
    throw std::invalid_argument(std::string("[") + op + "] a weight row of " +
                                std::to_string(w.shape(-1)) +
                                " bytes is not whole blocks of " +
                                std::to_string(block_bytes(type)));
  }
}

mx::array
as_input(const mx::array& x, int64_t K, const char* op, mx::Stream s) {
  if (!mx::issubdtype(x.dtype(), mx::floating) || x.dtype() == mx::float64) {
    throw std::invalid_argument(std::string("[") + op +
                                "] x must be float32, float16 or bfloat16");
  }
  if (x.ndim() < 1 || x.shape(-1) != K) {
    throw std::invalid_argument(std::string("[") + op + "] x has " +
                                std::to_string(x.ndim() ? x.shape(-1) : 0) +
                                " columns, the weights " + std::to_string(K));
  }
  return mx::astype(x, mx::float32, s);
}

} // namespace

bool block_type_supported(int type) {
  return type == kQ8_0 || type == kMxfp4;
}

int block_bytes(int type) {
  if (type == kQ8_0) {
    return 34;
  }
  if (type == kMxfp4) {
    return 17;
  }
  throw std::invalid_argument("GGML type " + std::to_string(type) +
                              " has no block kernel");
}

const BlockIsa& block_isa_generic() {
  return kGeneric;
}

const BlockIsa* block_isa_avx2() {
#if defined(MHC_HAVE_X86_KERNELS)
  return quant::cpu_has_avx2() ? avx2::get() : nullptr;
#else
  return nullptr;
#endif
}

const BlockIsa& block_isa() {
  const BlockIsa* i = current.load(std::memory_order_acquire);
  if (!i) {
    i = best();
    current.store(i, std::memory_order_release);
  }
  return *i;
}

bool set_block_isa(const char* name) {
  for (const BlockIsa* i : {block_isa_avx2(), &kGeneric}) {
    if (i && std::strcmp(i->name, name) == 0) {
      current.store(i, std::memory_order_release);
      return true;
    }
  }
  return false;
}

std::vector<std::string> block_isas() {
  std::vector<std::string> v;
  for (const BlockIsa* i : {block_isa_avx2(), &kGeneric}) {
    if (i) {
      v.emplace_back(i->name);
    }
  }
  return v;
}

void block_matmul(int type, std::vector<BlockJob>& jobs) {
  const BlockIsa& isa = block_isa();
  struct Task {
    const BlockJob* job;
    int64_t n0, n1;
  };
  std::vector<Task> tasks;
  int64_t bytes = 0;
  for (const BlockJob& job : jobs) {
    if (job.x.empty() || job.rows == 0) {
      continue;
    }
    if (int64_t(job.x.size()) >= quant::gemm_rows()) {
      gemm(isa, type, job);
      continue;
    }
    const int64_t step = std::max<int64_t>(
        4, kMinTaskBytes / std::max<int64_t>(job.row_bytes, 1));
    for (int64_t n0 = 0; n0 < job.rows; n0 += step) {
      tasks.push_back({&job, n0, std::min(job.rows, n0 + step)});
    }
    bytes += job.rows * job.row_bytes * int64_t(job.x.size()); // per x row
  }
  auto run = [&](int64_t t) {
    const Task& k = tasks[t];
    isa.gemv(type,
             k.job->w,
             k.job->row_bytes,
             k.job->x.data(),
             int(k.job->x.size()),
             k.job->y.data(),
             k.n0,
             k.n1);
  };
  if (bytes < quant::parallel_bytes()) { // waking workers costs more
    for (size_t t = 0; t < tasks.size(); ++t) {
      run(int64_t(t));
    }
  } else {
    quant::Pool::instance().run(int64_t(tasks.size()), run);
  }
}

mx::array block_matmul_op(const mx::array& x,
                          const mx::array& w,
                          int type,
                          mx::StreamOrDevice s) {
  const char* op = "gguf_matmul";
  check_type(type, op);
  const mx::Stream st = cpu_stream(s, op);
  check_weights(w, 2, type, op);
  auto xf = as_input(x, cols_of(type, w.shape(1)), op, st);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  auto out = mx::array(
      shape, mx::float32, std::make_shared<BlockMatmul>(st, type, 0), {xf, w});
  return mx::astype(out, x.dtype(), st);
}

mx::array block_gather_op(const mx::array& x,
                          const mx::array& w,
                          const mx::array& indices,
                          int type,
                          mx::StreamOrDevice s) {
  const char* op = "gguf_gather_matmul";
  check_type(type, op);
  const mx::Stream st = cpu_stream(s, op);
  check_weights(w, 3, type, op);
  if (x.ndim() < 2) {
    throw std::invalid_argument("[gguf_gather_matmul] x must be (..., M, K)");
  }
  if (!mx::issubdtype(indices.dtype(), mx::integer)) {
    throw std::invalid_argument(
        "[gguf_gather_matmul] indices must be integers");
  }
  auto xf = as_input(x, cols_of(type, w.shape(2)), op, st);
  // As mx.gather_qmm: x's batch dims broadcast against the indices'.
  mx::Shape xbatch(x.shape().begin(), x.shape().end() - 2);
  const auto batch = mx::broadcast_shapes(xbatch, indices.shape());
  int nb = 1;
  for (int d : xbatch) {
    nb *= d;
  }
  auto lhs = mx::broadcast_to(
      mx::reshape(mx::arange(nb, mx::uint32, st), xbatch, st), batch, st);
  auto rhs = mx::broadcast_to(mx::astype(indices, mx::uint32, st), batch, st);
  auto shape = batch;
  shape.push_back(x.shape(-2));
  shape.push_back(w.shape(1));
  auto out = mx::array(shape,
                       mx::float32,
                       std::make_shared<BlockMatmul>(st, type, 1),
                       {xf, w, lhs, rhs});
  return mx::astype(out, x.dtype(), st);
}

mx::array
block_dequantize_op(const mx::array& w, int type, mx::StreamOrDevice s) {
  const char* op = "gguf_dequantize";
  check_type(type, op);
  const mx::Stream st = cpu_stream(s, op);
  if (w.dtype() != mx::uint8 || w.ndim() < 1 ||
      w.shape(-1) % block_bytes(type) != 0) {
    throw std::invalid_argument(
        "[gguf_dequantize] w must be uint8 rows of whole GGUF blocks");
  }
  auto shape = w.shape();
  shape.back() = int(cols_of(type, w.shape(-1)));
  return mx::array(
      shape, mx::float32, std::make_shared<BlockMatmul>(st, type, 2), {w});
}

namespace {

void run_block(std::vector<mx::array>& ins,
               std::vector<mx::array>& outs,
               int type,
               int kind) {
  if (kind == 0) {
    run_dense(outs[0], ins[0], ins[1], type);
  } else if (kind == 1) {
    run_gather(outs[0], ins[0], ins[1], ins[2], ins[3], type);
  } else {
    run_dequant(outs[0], ins[0], type);
  }
}

// MLX's ops on the dequantized weights: what the transforms differentiate.
std::vector<mx::array> block_reference(const std::vector<mx::array>& in,
                                       int type,
                                       int kind,
                                       mx::Stream s) {
  if (kind == 2) {
    return {block_dequantize_op(in[0], type, s)};
  }
  auto w = block_dequantize_op(in[1], type, s);
  if (kind == 0) {
    return {mx::matmul(in[0], mx::transpose(w, s), s)};
  }
  return {
      mx::gather_mm(in[0], mx::swapaxes(w, -1, -2, s), in[2], in[3], false, s)};
}

} // namespace

BlockMatmul::BlockMatmul(mx::Stream stream, int type, int kind)
    : CpuPrimitive(
          stream,
          "MhcGgufBlockMatmul",
          std::to_string(type) + "," + std::to_string(kind),
          [type, kind, stream](std::vector<mx::array> in) {
            return block_reference(in, type, kind, stream);
          },
          [type, kind](std::vector<mx::array>& ins,
                       std::vector<mx::array>& outs) {
            run_block(ins, outs, type, kind);
          }),
      type_(type), kind_(kind) {}

std::vector<mx::Shape>
BlockMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  if (kind_ == 2) {
    auto shape = inputs[0].shape();
    shape.back() = int(cols_of(type_, shape.back()));
    return {shape};
  }
  if (kind_ == 0) {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }
  auto shape = inputs[3].shape();
  shape.push_back(inputs[0].shape(-2));
  shape.push_back(inputs[1].shape(1));
  return {shape};
}

// -- mapped files
// --------------------------------------------------------------

FileMapping::FileMapping(const std::string& path, bool populate) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw std::runtime_error("cannot open " + path + ": " +
                             std::strerror(errno));
  }
  struct stat st{};
  if (::fstat(fd, &st) != 0 || st.st_size <= 0) {
    ::close(fd);
    throw std::runtime_error(path + " is empty or cannot be read");
  }
  size_ = size_t(st.st_size);
  int flags = MAP_PRIVATE;
#if defined(MAP_POPULATE)
  // Page tables filled now (as llama.cpp maps): else every first touch of a
  // 4 KB page in decode is a fault, measured 2.7x slower per token at first.
  if (populate) {
    flags |= MAP_POPULATE;
  }
#endif
  void* p = ::mmap(nullptr, size_, PROT_READ, flags, fd, 0);
  const int err = errno;
  ::close(fd); // the mapping keeps the file
  if (p == MAP_FAILED) {
    throw std::runtime_error("cannot map " + path + ": " + std::strerror(err));
  }
  base_ = static_cast<uint8_t*>(p);
#if !defined(MAP_POPULATE)
  if (populate) {
    ::madvise(base_, size_, MADV_WILLNEED);
  }
#endif
}

FileMapping::~FileMapping() {
  if (base_) {
    ::munmap(base_, size_);
  }
}

bool mapped_arrays_zero_copy() {
  // MLX's common CPU allocator keeps a size_t header before the data and its
  // Buffer points at the header (raw_ptr() = ptr + sizeof(size_t)). Checked on
  // a live buffer, so a build with another allocator (Metal, CUDA) copies.
  static const bool ok = [] {
    constexpr size_t n = 4096 + 24;
    auto b = mx::allocator::allocator().malloc(n);
    const bool same =
        b.ptr() != nullptr &&
        b.raw_ptr() == static_cast<char*>(b.ptr()) + sizeof(size_t) &&
        *static_cast<const size_t*>(b.ptr()) >= n;
    mx::allocator::allocator().free(b);
    return same;
  }();
  return ok;
}

mx::array foreign_array(uint8_t* data,
                        const mx::Shape& shape,
                        mx::Dtype dtype,
                        std::shared_ptr<const void> owner) {
  // The deleter only drops this array's hold on the owner.
  mx::allocator::Data d(mx::allocator::Buffer(data - sizeof(size_t)),
                        [owner = std::move(owner)](mx::allocator::Buffer) {});
  return mx::array(std::move(d), shape, dtype);
}

mx::array make_mapped_array(const std::shared_ptr<FileMapping>& map,
                            int64_t offset,
                            const mx::Shape& shape,
                            mx::Dtype dtype) {
  int64_t count = 1;
  for (int d : shape) {
    if (d < 0) {
      throw std::invalid_argument("mapped array: negative dimension");
    }
    count *= d;
  }
  const int64_t nbytes = count * int64_t(mx::size_of(dtype));
  // The header slot before the data lies inside the file (its header).
  if (offset < int64_t(sizeof(size_t)) || nbytes < 0 ||
      uint64_t(offset + nbytes) > map->size()) {
    throw std::invalid_argument(
        "mapped array: bytes [" + std::to_string(offset) + ", " +
        std::to_string(offset + nbytes) + ") are outside the file");
  }
  auto* ptr = const_cast<uint8_t*>(map->data()) + offset;
  if (mapped_arrays_zero_copy()) {
    return foreign_array(ptr, shape, dtype, map);
  }
  return mx::array(static_cast<void*>(ptr), shape, dtype, [map](void*) {});
}

} // namespace mlx_harmony_core::gguf
