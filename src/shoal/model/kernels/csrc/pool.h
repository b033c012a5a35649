// The kernels' parallel loops: items claimed one chunk at a time by whichever thread is
// running, and no thread waits for another to show up.
//
// Why not OpenMP: decoding one sequence runs ~150 parallel regions per token of a few to a
// hundred microseconds each. An OpenMP region splits its items evenly and ends at a
// barrier, so it lasts as long as its slowest thread; on a machine whose cores other
// processes (or this server's own event loop and HTTP threads) also use, the second thread is
// often not running at that moment, and the caller sat at the barrier for most of each step
// (py-spy of a one-stream server: ~2/3 of the engine thread's samples inside libgomp's wait).
// Here the calling thread claims chunks too and never waits for a worker that has not
// claimed one: a busy or sleeping worker only means the caller does more of the job.
//
// Results cannot depend on which thread computes an item: callers give each item its own
// output and fixed arithmetic (every kernel here already is batch- and thread-invariant).
//
// One job at a time: a second thread that finds the pool busy (two engines in a process)
// runs its job alone, as does a job started from inside a pool worker or an OpenMP region.
// Workers spin for a millisecond after a job (the next one comes within microseconds in a
// step, within a millisecond between decode steps), then sleep until the next job.
#pragma once

#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <algorithm>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SHOAL_PAUSE() _mm_pause()
#else
#define SHOAL_PAUSE() std::this_thread::yield()
#endif

namespace shoal {

// f(begin, end) over [0, n) as one OpenMP region, one contiguous chunk of at least `grain`
// items per thread (at::parallel_for's split): the pool's switched-off mode.
template <typename F>
inline void omp_split_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t max_threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  const int64_t chunks = std::min<int64_t>(max_threads, (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1) { f(0, n); return; }
#pragma omp parallel num_threads(static_cast<int>(chunks))
  {
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t step = (n + nt - 1) / nt;
    const int64_t begin = tid * step, end = std::min<int64_t>(n, begin + step);
    if (begin < end) f(begin, end);
  }
}

class WorkPool {
 public:
  // f(begin, end) over [0, n) in chunks of `chunk` items, on this thread and the workers.
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  template <typename F>
  void run(int64_t n, int64_t chunk, const F& f) {
    if (n <= 0) return;
    chunk = std::max<int64_t>(chunk, 1);
    if (!enabled().load(std::memory_order_relaxed) || openmp_here()) {   // OpenMP's even split
      omp_split_for(n, chunk, f);
      return;
    }
    const int64_t chunks = (n + chunk - 1) / chunk;
    if (chunks <= 1 || workers_.empty() || in_worker() || omp_in_parallel() || !busy_.try_lock()) {
      f(0, n);
      return;
    }
    Job job{n, chunk, &f, [](const void* ctx, int64_t b, int64_t e) {
              (*static_cast<const F*>(ctx))(b, e);
            }};
    job_.store(&job, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32, std::memory_order_seq_cst);   // publishes job_ (release)
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    int64_t mine = 0;
    while (claim_and_run(gen)) ++mine;
    // only chunks a worker has claimed are waited for
    done_.fetch_add(mine, std::memory_order_relaxed);
    while (done_.load(std::memory_order_acquire) < chunks) SHOAL_PAUSE();
    busy_.unlock();
  }

  // On for a thread whose work alternates with torch's own OpenMP regions at every layer (an
  // encoder's engine thread): its jobs run as OpenMP regions too. NOTE: torch's OpenMP
  // workers spin after each of its ops and took a core from the pool's worker there
  // (all-MiniLM, 2 threads: 0.93k sentences/s on the pool, 1.4-1.8k as OpenMP regions).
  static bool& openmp_here() {
    thread_local bool flag = false;
    return flag;
  }

  // Off: jobs run as OpenMP regions instead (benchmarks compare the two; same results).
  static std::atomic<bool>& enabled() {
    static std::atomic<bool> flag{true};
    return flag;
  }

  // The process's pool: omp_get_max_threads() - 1 workers (torch.set_num_threads and
  // OMP_NUM_THREADS apply) when first used; a forked child makes its own.
  static WorkPool& get() {
    static std::mutex guard;
    static WorkPool* pool = nullptr;
    static pid_t owner = 0;
    const pid_t pid = getpid();
    if (pool != nullptr && owner == pid) return *pool;
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || owner != pid) {
      pool = new WorkPool(std::max(0, omp_get_max_threads() - 1));   // NOTE: lives as long as the process
      owner = pid;
    }
    return *pool;
  }

 private:
  struct Job {
    int64_t n, chunk;
    const void* ctx;
    void (*call)(const void*, int64_t, int64_t);
  };

  explicit WorkPool(int workers) {
    for (int i = 0; i < workers; ++i) workers_.emplace_back([this] { work(); });
    for (auto& t : workers_) t.detach();
  }

  static bool& in_worker() {
    static thread_local bool flag = false;
    return flag;
  }

  // Claims the next chunk of job `gen` and runs it; false when none is left (or the job is over).
  // NOTE: job_ is read only after a successful claim: the job of `gen` then still has a chunk
  // unfinished (this one), so its caller is still waiting and the job is alive.
  bool claim_and_run(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if ((s >> 32) != gen) return false;
      const int64_t next = static_cast<int64_t>(s & 0xFFFFFFFFu);
      if (next >= chunks_.load(std::memory_order_relaxed)) return false;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        const Job* job = job_.load(std::memory_order_relaxed);
        const int64_t b = next * job->chunk;
        job->call(job->ctx, b, std::min(job->n, b + job->chunk));
        return true;
      }
    }
  }

  void work() {
    in_worker() = true;
    uint64_t last = 0;   // the generation this worker last found exhausted
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      auto idle_since = std::chrono::steady_clock::now();
      int spins = 0;
      while ((s >> 32) == last) {
        SHOAL_PAUSE();
        s = state_.load(std::memory_order_acquire);
        if (++spins % 256 == 0 &&
            std::chrono::steady_clock::now() - idle_since > std::chrono::microseconds(kSpinMicros)) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          while (((s = state_.load(std::memory_order_seq_cst)) >> 32) == last) wake_.wait(lock);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          idle_since = std::chrono::steady_clock::now();
        }
      }
      const uint64_t gen = s >> 32;
      int64_t mine = 0;
      while (claim_and_run(gen)) ++mine;
      if (mine) done_.fetch_add(mine, std::memory_order_release);
      last = gen;
    }
  }

  // NOTE: past the gap between two decode steps (the engine's Python, ~0.3-1 ms), so the
  // first job of a step finds the worker awake rather than waiting on its wake-up.
  static constexpr int kSpinMicros = 1000;
  std::vector<std::thread> workers_;
  std::mutex busy_;
  std::mutex mutex_;
  std::condition_variable wake_;
  // NOTE: each on its own cache line: idle workers poll state_, and a claim that also
  // invalidated the line of done_ or the job would cost every thread a second miss.
  alignas(64) std::atomic<uint64_t> state_{0};    // generation << 32 | next chunk
  alignas(64) std::atomic<int64_t> done_{0};      // chunks finished in this generation
  alignas(64) std::atomic<int> sleepers_{0};
  alignas(64) std::atomic<int64_t> chunks_{0};    // the current generation's chunk count
  std::atomic<const Job*> job_{nullptr};
};

}  // namespace shoal
