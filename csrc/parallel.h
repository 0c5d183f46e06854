// fastattn: the CPU kernels' parallel loop, parallel_for(n, threads, fn(begin, end, tid)), and the threads
// that run it.
//
// Work distribution. Every loop hands out its items dynamically: chunks of `grain` consecutive items taken
// from one shared counter. No thread owns work that another cannot take, so when a thread is descheduled
// (the cores are shared with other processes) the others take what is left, and the loop waits at most for
// the chunk that thread has in flight. The kernels keep chunks short: an item is a query block of one head,
// one kv head's gradients or a few rows, and the default grain gives ~32 chunks per thread. Which thread runs
// an item never changes its result: an item writes only its own outputs, and every sum over items is done
// inside one item in a fixed order, so results are bit-identical for any thread count and any schedule.
//
// Threads. Two teams can run a loop; the caller is thread 0 of both.
//  - torch's OpenMP team ("openmp"): the module links libgomp.so.1, which resolves to the copy torch loaded.
//    After each of its parallel regions torch's workers spin for milliseconds waiting for the next one, so a
//    loop that follows a torch op finds them running and they join at once; threads of our own would instead
//    compete with those spinning workers for the cores. But a region ends only when every thread of the team
//    has arrived, and the runtime's waits spin: on shared cores a descheduled worker makes the caller spin
//    until the scheduler runs that worker again (a time slice, milliseconds).
//  - our own pool ("own", ThreadPool below): once the caller has taken the last chunk it closes the loop, so
//    a worker that has not joined by then stays out and the caller waits only for chunks already in flight.
//    Its waits spin for at most FASTATTN_SPIN_US microseconds (default 50; none with more threads than CPUs)
//    and then sleep, so a waiting thread gives its core back.
// With the cores shared, a loop's threads must also sit on different CPUs: the scheduler is as happy to stack
// two of them on one CPU (their loop then gets one CPU) as to pair each with another process's thread (one
// and a half). So an own-pool worker that joins a loop on the CPU of another thread of the loop moves off it
// for good (ThreadPool::spread), and a thread of torch's team that starts a region on the caller's CPU moves
// off it for that region only (omp_run). The caller is not moved for this.
// A thread that loses its CPU in the middle of a chunk still holds the loop up until the scheduler runs it again,
// a time slice later. In the own pool, a thread that finds no chunk left and sees another hold one for several
// chunks' time moves that thread onto its own CPU and sleeps, giving the CPU to it (ThreadPool::rescue). The
// caller too can be moved so; a moved thread gets its affinity back as soon as its chunk is done.
// FASTATTN_POOL=openmp / own picks one; by default (auto, TeamChooser) loops run on the OpenMP team, and the
// caller times the end of each region: when the team keeps arriving late (the cores are shared), loops move
// to the own pool, and one region now and then tries the OpenMP team again. Forked children and builds
// without OpenMP always use the own pool (libgomp does not survive fork).
#pragma once

#include <algorithm>
#include <atomic>
#include <bitset>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "isa.h"  // names the instruction-set namespace, FASTATTN_NS

namespace fastattn {
namespace FASTATTN_NS {

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The CPU the calling thread runs on now (-1 where the system does not say).
inline int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Moves the calling thread off `cpu`: its affinity becomes what it was (saved in `before`) minus that CPU.
// False, and nothing changed, when that would leave no CPU or the system refuses.
inline bool leave_cpu(int cpu, cpu_set_t& before) {
#if defined(__linux__)
  if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof(before), &before) != 0) return false;
  cpu_set_t want = before;
  CPU_CLR(cpu, &want);
  return CPU_COUNT(&want) > 0 && sched_setaffinity(0, sizeof(want), &want) == 0;
#else
  (void)cpu;
  (void)before;
  return false;
#endif
}

// Busy-waits (with pause) until pred() or `us` microseconds pass; returns pred()'s last value.
template <typename Pred>
bool spin_until(Pred pred, long us) {
  if (pred()) return true;
  if (us <= 0) return false;
  const auto t0 = std::chrono::steady_clock::now();
  for (uint32_t k = 1;; ++k) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (pred()) return true;
    if ((k & 63u) == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(us)) return pred();
  }
}

// The calling thread's id for the scheduler (what sched_setaffinity takes for another thread); 0 where unknown.
// Not cached: a forked child's thread would inherit its parent's cached id.
inline pid_t os_thread_id() {
#if defined(__linux__)
  return static_cast<pid_t>(syscall(SYS_gettid));
#else
  return 0;
#endif
}

// Microseconds a waiting thread of the own pool spins before it sleeps (FASTATTN_SPIN_US, default 50).
inline long spin_budget_us() {
  static const long us = [] {
    const char* env = std::getenv("FASTATTN_SPIN_US");
    return env ? std::max(0L, std::atol(env)) : 50L;
  }();
  return us;
}

// ============================================================================================ own pool

// The persistent pool: run(n, nt, grain, fn) runs fn over [0, n) in chunks of `grain`, on the caller
// (tid 0) and on the workers 1 .. nt-1 that join in time (see the header comment). One loop at a time
// (try_acquire); re-created lazily after fork() (the child has none of the parent's threads).
//
// One word, state_, says which loop is open and who is inside it:
//   bits 0-15  workers inside the loop (joined, not yet left)
//   bit  16    closed: the caller has taken the last chunk; nobody may join any more
//   bits 17-27 the loop's thread count nt (workers with tid >= nt stay out)
//   bits 28-   generation, +1 per loop
// A worker joins with a compare-and-swap that fails once the generation moved on or the loop closed, so the
// loop's fields (ctx_, call_, n_, grain_), written before its generation is published, are read only by
// workers inside it, and the caller rewrites them only after the last one has left.
class ThreadPool {
 public:
  using Call = void (*)(void* ctx, int64_t begin, int64_t end, int tid);
  static constexpr int64_t kMaxThreads = 1024;

  ThreadPool() {
    CPU_ZERO(&allowed_);
    have_allowed_ = sched_getaffinity(0, sizeof(allowed_), &allowed_) == 0;
    ncpu_ = have_allowed_ ? CPU_COUNT(&allowed_) : static_cast<int>(std::thread::hardware_concurrency());
    for (auto& c : cpu_) c.store(-1, std::memory_order_relaxed);
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Threads moved by a rescue so far (see rescue()).
  int64_t rescues() const { return rescues_.load(std::memory_order_relaxed); }

  // One loop per process at a time, on either team: a concurrent loop (another Python thread) or a nested one
  // (a chunk that starts a loop) runs inline instead of multiplying the threads.
  bool try_acquire() {
    bool expected = false;
    return !in_worker() && busy_.compare_exchange_strong(expected, true, std::memory_order_acquire);
  }
  void release() { busy_.store(false, std::memory_order_release); }

  // Runs call over [0, n) with up to nt (2 .. kMaxThreads) threads; returns after every item is done.
  // The caller holds try_acquire().
  void run(int64_t n, int nt, int64_t grain, void* ctx, Call call) {
    nt = static_cast<int>(std::min<int64_t>(nt, kMaxThreads));
    ensure_workers(nt - 1);
    // Spinning only pays when every thread has a CPU; oversubscribed, it steals the CPUs doing the work.
    const long spin = static_cast<int>(workers_.size()) + 1 <= std::max(1, ncpu_) ? spin_budget_us() : 0;
    spin_us_.store(spin, std::memory_order_relaxed);
    ctx_ = ctx;
    call_ = call;
    n_ = n;
    grain_ = grain;
    for (int t = 1; t < nt; ++t) cpu_[t].store(-1, std::memory_order_relaxed);
    cpu_[0].store(current_cpu(), std::memory_order_relaxed);
    os_tid_[0].store(os_thread_id(), std::memory_order_relaxed);
    rescue_state_[0].store(kArmed, std::memory_order_relaxed);
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> kGenShift) + 1;
    state_.store(gen << kGenShift | static_cast<uint64_t>(nt) << kNtShift, std::memory_order_seq_cst);
    if (sleeping_workers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }  // a worker between its check and its wait holds the lock
      cv_work_.notify_all();
    }
    const int64_t mean_chunk = work(0);
    disarm(0);
    const bool pulled = rescue(0, mean_chunk);
    // Every chunk is taken: close the loop, then wait for the workers inside to finish theirs.
    const uint64_t before = state_.fetch_or(kClosed, std::memory_order_acq_rel);
    auto drained = [&] { return (state_.load(std::memory_order_seq_cst) & kCountMask) == 0; };
    if ((before & kCountMask) != 0 && !spin_until(drained, pulled ? 0 : spin)) {
      std::unique_lock<std::mutex> lk(mu_);
      caller_sleeping_.store(true, std::memory_order_seq_cst);
      cv_done_.wait(lk, drained);
      caller_sleeping_.store(false, std::memory_order_relaxed);
    }
    if (error_) std::rethrow_exception(error_);
  }

  static bool& in_worker() {
    static thread_local bool flag = false;
    return flag;
  }

 private:
  static constexpr uint64_t kCountMask = (uint64_t(1) << 16) - 1;
  static constexpr uint64_t kClosed = uint64_t(1) << 16;
  static constexpr int kNtShift = 17;
  static constexpr uint64_t kNtMask = (uint64_t(1) << 11) - 1;
  static constexpr int kGenShift = 28;

  // Runs chunks until none is left; returns the mean time of the chunks it ran (0: none).
  int64_t work(int tid) {
    int64_t chunks = 0, busy = 0;
    try {
      for (;;) {
        const int64_t b = next_.fetch_add(grain_, std::memory_order_relaxed);
        if (b >= n_) break;
        const int64_t t0 = now_ns();
        started_[tid].store(t0, std::memory_order_relaxed);
        call_(ctx_, b, std::min(n_, b + grain_), tid);
        started_[tid].store(0, std::memory_order_relaxed);
        busy += now_ns() - t0;
        ++chunks;
      }
    } catch (...) {
      started_[tid].store(0, std::memory_order_relaxed);
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
      next_.store(n_, std::memory_order_relaxed);
    }
    return chunks ? busy / chunks : 0;
  }

  // Rescue. Called by thread `tid` of the open loop once it has run its last chunk, while other threads may
  // still hold one. A thread that holds its chunk for longer than kRescueFloor and four of this thread's mean
  // chunks has most likely lost its CPU to another process, and would get it back only after that process's
  // time slice (milliseconds; the whole call waits for it). It is moved onto this thread's CPU (move_here),
  // which this thread then gives up by sleeping instead of spinning, so it runs again at once; it gets its own
  // affinity back once its chunks are done (disarm). This thread watches, spinning, for at most kRescueWatch.
  // Returns whether it moved a thread. Off for a thread that ran no chunk (no measure of a chunk's time), when
  // the loop has more threads than CPUs or waits must not spin (FASTATTN_SPIN_US=0), and with FASTATTN_RESCUE=0.
  bool rescue(int tid, int64_t mean_chunk_ns) {
    static const bool off = [] {
      const char* e = std::getenv("FASTATTN_RESCUE");
      return e != nullptr && std::strcmp(e, "0") == 0;
    }();
    const int nt = static_cast<int>((state_.load(std::memory_order_relaxed) >> kNtShift) & kNtMask);
    if (off || mean_chunk_ns <= 0 || !have_allowed_ || ncpu_ < 2 || nt > ncpu_ || spin_budget_us() <= 0) return false;
    const int64_t limit = std::max(kRescueFloor, 4 * mean_chunk_ns), t0 = now_ns();
    for (;;) {
      bool any = false;
      const int64_t now = now_ns();
      for (int t = 0; t < nt; ++t) {
        if (t == tid) continue;
        const int64_t s = started_[t].load(std::memory_order_relaxed);
        if (s == 0) continue;
        any = true;
        if (now - s > limit && move_here(t)) return true;
      }
      if (!any || now - t0 > kRescueWatch) return false;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }

  // Moves loop thread t onto the calling thread's CPU, keeping its affinity before in saved_[t]. Only while t is
  // armed (holds chunks of this loop): once t has disarmed, nothing moves it.
  bool move_here(int t) {
#if defined(__linux__)
    const int cpu = current_cpu();
    const pid_t id = os_tid_[t].load(std::memory_order_relaxed);
    int armed = kArmed;
    if (cpu < 0 || cpu >= CPU_SETSIZE || id <= 0 ||
        !rescue_state_[t].compare_exchange_strong(armed, kMoving, std::memory_order_acq_rel))
      return false;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    const bool ok = sched_getaffinity(id, sizeof(saved_[t]), &saved_[t]) == 0 &&
                    sched_setaffinity(id, sizeof(one), &one) == 0;
    rescue_state_[t].store(ok ? kMoved : kIdle, std::memory_order_release);
    if (ok) rescues_.fetch_add(1, std::memory_order_relaxed);
    return ok;
#else
    (void)t;
    return false;
#endif
  }

  // Thread t (the calling thread) has run its last chunk of the loop: no rescue may move it from now on, and if
  // one did, it gets back the affinity it had. A move in progress (begun just as the chunk ended) is waited for.
  void disarm(int t) {
    int m = rescue_state_[t].load(std::memory_order_acquire);
    for (;;) {
      if (m == kMoving) {
        sched_yield();
        m = rescue_state_[t].load(std::memory_order_acquire);
      } else if (rescue_state_[t].compare_exchange_weak(m, kIdle, std::memory_order_acq_rel)) {
        break;
      }
    }
    if (m == kMoved) sched_setaffinity(0, sizeof(saved_[t]), &saved_[t]);
  }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int tid = static_cast<int>(workers_.size()) + 1;
      // The generation is read here, before run() publishes the loop being started: a worker that read it
      // on its own thread could start after that, take the new loop for an old one and miss it.
      const uint64_t seen = state_.load(std::memory_order_acquire) >> kGenShift;
      workers_.emplace_back([this, tid, seen] { loop(tid, seen); });
      workers_.back().detach();  // the pool is never destroyed (see get_pool)
    }
  }

  void loop(int tid, uint64_t seen) {
    in_worker() = true;
    os_tid_[tid].store(os_thread_id(), std::memory_order_relaxed);
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "fastattn-pool");  // how the workers show in top and /proc
#endif
    auto posted = [&] { return (state_.load(std::memory_order_seq_cst) >> kGenShift) != seen; };
    bool pulled = false;  // this thread just gave its CPU to a thread it moved: sleep at once
    for (;;) {
      const bool no_spin = pulled;
      pulled = false;
      if (!spin_until(posted, no_spin ? 0 : spin_us_.load(std::memory_order_relaxed))) {
        std::unique_lock<std::mutex> lk(mu_);
        sleeping_workers_.fetch_add(1, std::memory_order_seq_cst);
        cv_work_.wait(lk, posted);
        sleeping_workers_.fetch_sub(1, std::memory_order_relaxed);
      }
      const uint64_t s = state_.load(std::memory_order_acquire);
      seen = s >> kGenShift;
      if (!join(tid, s)) continue;
      spread(tid, static_cast<int>((s >> kNtShift) & kNtMask));
      rescue_state_[tid].store(kArmed, std::memory_order_release);
      const int64_t mean_chunk = work(tid);
      disarm(tid);
      pulled = rescue(tid, mean_chunk);
      leave();
    }
  }

  // Enters the loop of state s unless it closed, moved on, or does not need thread tid.
  bool join(int tid, uint64_t s) {
    const uint64_t gen = s >> kGenShift;
    if (static_cast<uint64_t>(tid) >= ((s >> kNtShift) & kNtMask)) return false;
    while ((s >> kGenShift) == gen && !(s & kClosed)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
    }
    return false;
  }

  // Keeps the loop's threads on different CPUs. When other processes hold some of the cores, the scheduler
  // is as content to put two of the loop's threads on one CPU (and a busy process alone on another) as to
  // pair each with a busy process: 3 runnable threads on 2 CPUs are "balanced" either way. Stacked, the two
  // threads get one CPU between them; paired, one and a half. So a worker that joins a loop on a CPU where
  // the caller or another worker of the loop already runs moves off it: its affinity becomes the CPUs the
  // process was allowed at the start minus those of the others (never empty; the scheduler still picks
  // among the rest). Only the pool's own workers are moved, never the caller or any other thread.
  void spread(int tid, int nt) {
    int mine = current_cpu();
    if (mine < 0 || !have_allowed_ || ncpu_ < 2) return;
    cpu_set_t others;
    CPU_ZERO(&others);
    bool clash = false;
    for (int t = 0; t < std::min(nt, static_cast<int>(kMaxThreads)); ++t) {
      const int c = t == tid ? -1 : cpu_[t].load(std::memory_order_relaxed);
      if (c < 0 || c >= CPU_SETSIZE) continue;
      CPU_SET(c, &others);
      clash = clash || c == mine;
    }
    if (clash) {
      cpu_set_t want;
      CPU_ZERO(&want);
      for (int c = 0; c < CPU_SETSIZE; ++c)
        if (CPU_ISSET(c, &allowed_) && !CPU_ISSET(c, &others)) CPU_SET(c, &want);
      if (CPU_COUNT(&want) > 0 && sched_setaffinity(0, sizeof(want), &want) == 0) mine = current_cpu();
    }
    cpu_[tid].store(mine, std::memory_order_relaxed);
  }
  void leave() {
    const uint64_t before = state_.fetch_sub(1, std::memory_order_seq_cst);
    if ((before & kClosed) && (before & kCountMask) == 1 && caller_sleeping_.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_done_.notify_one();
    }
  }

  std::atomic<bool> busy_{false};
  std::mutex mu_;  // sleeping and waking only
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> sleeping_workers_{0};
  std::atomic<bool> caller_sleeping_{false};
  std::atomic<long> spin_us_{0};
  int ncpu_ = 1;
  cpu_set_t allowed_;   // the CPUs the process could use when the pool was made
  bool have_allowed_ = false;
  std::atomic<int> cpu_[kMaxThreads];  // the CPU each thread of the open loop found itself on (-1: not known)
  std::atomic<int64_t> started_[kMaxThreads] = {};  // when thread t's chunk in flight started (0: none)
  std::atomic<pid_t> os_tid_[kMaxThreads] = {};
  // Thread t's rescue state: idle (not in a loop, or done with its chunks) -> armed (may be moved) -> moving
  // (a rescuer is changing its affinity) -> moved (its affinity before is in saved_[t]) -> idle (disarm).
  static constexpr int kIdle = 0, kArmed = 1, kMoving = 2, kMoved = 3;
  std::atomic<int> rescue_state_[kMaxThreads] = {};
  cpu_set_t saved_[kMaxThreads];
  std::atomic<int64_t> rescues_{0};
  static constexpr int64_t kRescueFloor = 100'000, kRescueWatch = 200'000;  // ns
  void* ctx_ = nullptr;
  Call call_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

// The process's pool; a forked child (different pid) gets a fresh one (the old object is leaked on
// purpose: its threads do not exist in the child and its mutexes may be held).
inline ThreadPool& get_pool() {
  static std::atomic<ThreadPool*> pool{nullptr};
  static std::atomic<pid_t> owner{0};
  static std::mutex create_mu;
  const pid_t pid = getpid();
  ThreadPool* p = pool.load(std::memory_order_acquire);
  if (p != nullptr && owner.load(std::memory_order_acquire) == pid) return *p;
  std::lock_guard<std::mutex> lk(create_mu);
  p = pool.load(std::memory_order_acquire);
  if (p == nullptr || owner.load(std::memory_order_acquire) != pid) {
    p = new ThreadPool();
    owner.store(pid, std::memory_order_release);
    pool.store(p, std::memory_order_release);
  }
  return *p;
}

// ============================================================================================ OpenMP team

#if defined(_OPENMP)
// How one OpenMP region went, from the caller's side.
struct RegionTiming {
  int64_t work_ns = 0;      // from the start of the region until the caller found no chunk left
  int64_t end_wait_ns = 0;  // from then until the region ended: chunks still in flight, workers still to arrive
  int64_t chunks = 0;       // chunks the caller ran
};

// Runs call over [0, n) on an OpenMP team of nt threads (the caller is thread 0).
template <typename Call>
RegionTiming omp_run(int64_t n, int nt, int64_t grain, Call&& call) {
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex mu;
  RegionTiming t;
  const int64_t t0 = now_ns();
  int64_t t_done = t0;
  const int caller_cpu = current_cpu();
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    // A team thread that starts on the caller's CPU leaves it for the region (see ThreadPool::spread for
    // why) and gets its own affinity back at the end: torch's threads are only borrowed.
    cpu_set_t before;
    const bool moved = tid != 0 && caller_cpu >= 0 && current_cpu() == caller_cpu && leave_cpu(caller_cpu, before);
    int64_t chunks = 0;
    try {
      for (;;) {
        const int64_t b = next.fetch_add(grain, std::memory_order_relaxed);
        if (b >= n) break;
        call(b, std::min(n, b + grain), tid);
        ++chunks;
      }
    } catch (...) {  // an exception must not leave the parallel region
      std::lock_guard<std::mutex> lk(mu);
      if (!error) error = std::current_exception();
      next.store(n, std::memory_order_relaxed);
    }
    if (moved) sched_setaffinity(0, sizeof(before), &before);
    if (tid == 0) {
      t_done = now_ns();
      t.chunks = chunks;
    }
  }
  t.work_ns = t_done - t0;
  t.end_wait_ns = now_ns() - t_done;
  if (error) std::rethrow_exception(error);
  return t;
}

// FASTATTN_POOL=auto (the default): which team runs the next loop. Used only by the thread holding the pool's
// try_acquire(), so its state needs no lock.
//
// A region is late when the caller, out of chunks, waited longer for the team than the chunks in flight can
// explain: more than kLateFloor and more than four of its own average chunks. On a machine to ourselves the
// other threads finish within about a chunk of the caller; with the cores shared, a descheduled worker keeps
// the caller waiting a time slice. Three late regions among the last eight move the loops to the own pool for
// a hold time; the first loop after it tries the team again. A try that comes back late doubles the hold, and
// so does giving the team up again within kShortStint of going back to it (up to kMaxHold): on a busy machine
// the team costs a few late regions per hold, and a machine that has become quiet gets it back within one.
class TeamChooser {
 public:
  static constexpr int64_t kLateFloor = 300'000;       // ns
  static constexpr int64_t kMinHold = 100'000'000;     // ns
  static constexpr int64_t kMaxHold = 2'000'000'000;   // ns
  static constexpr int64_t kShortStint = 1'000'000'000;  // ns on the team that count as "soon"

  bool use_team(int64_t now) const { return team_ || now >= hold_until_; }

  void record(const RegionTiming& t, int64_t now) {
    const int64_t avg_chunk = t.work_ns / std::max<int64_t>(1, t.chunks);
    const bool late = t.end_wait_ns > std::max(kLateFloor, 4 * avg_chunk);
    if (!team_) {  // the try after a hold
      if (late) {
        hold_ = std::min(kMaxHold, 2 * hold_);
        hold_until_ = now + hold_;
      } else {
        team_ = true;
        since_ = now;
        history_ = 0;
      }
      return;
    }
    history_ = static_cast<uint8_t>(history_ << 1 | (late ? 1 : 0));
    if (std::bitset<8>(history_).count() >= 3) {
      team_ = false;
      hold_ = now - since_ < kShortStint ? std::min(kMaxHold, 2 * hold_) : kMinHold;
      hold_until_ = now + hold_;
    }
  }

 private:
  bool team_ = true;        // the loops run on the team (else on the own pool until hold_until_)
  uint8_t history_ = 0;     // the last eight regions, 1 = late
  int64_t since_ = 0;       // when the loops last moved to the team
  int64_t hold_until_ = 0;
  int64_t hold_ = kMinHold;
};

inline TeamChooser& team_chooser() {
  static TeamChooser c;
  return c;
}
#endif

// ============================================================================================ the loop

inline const pid_t kLoadPid = getpid();

enum class PoolMode { kAuto, kOpenMP, kOwn };

// FASTATTN_POOL: "openmp", "own", anything else (or unset) auto. Read once per process.
inline PoolMode pool_mode() {
  static const PoolMode m = [] {
    const char* e = std::getenv("FASTATTN_POOL");
    if (e != nullptr && std::strcmp(e, "openmp") == 0) return PoolMode::kOpenMP;
    if (e != nullptr && std::strcmp(e, "own") == 0) return PoolMode::kOwn;
    return PoolMode::kAuto;
  }();
  return m;
}

// Whether torch's OpenMP team may run loops here (built with OpenMP, not a forked child, not forced own).
inline bool openmp_usable() {
#if defined(_OPENMP)
  return pool_mode() != PoolMode::kOwn && getpid() == kLoadPid;
#else
  return false;
#endif
}

// Name of the team loops run on: "openmp" (torch's team; in auto mode the loops move to the own pool while
// that team arrives late) or "own".
inline const char* pool_name() { return openmp_usable() ? "openmp" : "own"; }

// fn(begin, end, tid) over [0, n_items) in dynamically scheduled chunks of `grain` items (0: ~32 chunks
// per thread), by up to num_threads threads incl. the caller. tid in [0, num_threads): index per-thread
// scratch with it. fn must give the same result whichever thread runs a chunk (see the header comment).
template <typename F>
void parallel_for(int64_t n_items, int num_threads, F&& fn, int64_t grain = 0) {
  if (n_items <= 0) return;
  if (num_threads < 1) num_threads = 1;
  if (grain <= 0) grain = std::max<int64_t>(1, n_items / (32 * static_cast<int64_t>(num_threads)));
  const int nt = static_cast<int>(std::min<int64_t>(num_threads, (n_items + grain - 1) / grain));
  ThreadPool* pool = nt > 1 ? &get_pool() : nullptr;
#if defined(_OPENMP)
  if (pool != nullptr && omp_in_parallel()) pool = nullptr;
#endif
  if (pool == nullptr || !pool->try_acquire()) {
    fn(int64_t(0), n_items, 0);
    return;
  }
  struct Release {
    ThreadPool* p;
    ~Release() { p->release(); }
  } release{pool};
#if defined(_OPENMP)
  if (openmp_usable()) {
    TeamChooser& chooser = team_chooser();
    const bool automatic = pool_mode() == PoolMode::kAuto;
    if (!automatic || chooser.use_team(now_ns())) {
      const RegionTiming t = omp_run(n_items, nt, grain, fn);
      if (automatic) chooser.record(t, now_ns());
      return;
    }
  }
#endif
  using Fn = std::remove_reference_t<F>;
  pool->run(n_items, nt, grain, const_cast<void*>(static_cast<const void*>(&fn)),
            [](void* ctx, int64_t b, int64_t e, int tid) { (*static_cast<Fn*>(ctx))(b, e, tid); });
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
