// The fiber scheduler behind emu.h: one launch runs its blocks one after
// another on the calling OS thread, each block's threads as fibers (ucontext
// to start, _setjmp/_longjmp to switch: no system call per switch). A fiber
// runs until it reaches a barrier (__syncthreads, or a warp shuffle) or
// returns; a barrier opens when every live thread of its block (or lane of its
// warp) has reached it. Errors a GPU would hang on or make garbage of are
// reported, not hidden:
//   - a block or warp that can no longer make progress (threads waiting at
//     different barriers): the launch stops with the fibers' states;
//   - a full-mask shuffle in a warp some of whose lanes have returned.
// Fibers run in index order or in reverse (`order`; reversed, the blocks run
// last to first too), so a read of shared memory that lacks its barrier, or
// of global memory another block writes, sees the other value in one of the
// two runs.
// Device buffers (arqon_emu_alloc) end exactly at a page no one may touch: a
// read or write past the end stops the process with the kernel, block and
// thread.
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "emu.h"

namespace arqon_emu {
namespace {

constexpr size_t STACK = 256 * 1024;
constexpr int WARP = 32;

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
    ucontext_t uc;
    jmp_buf jb;
    bool started = false;
    State state = State::Ready;
    uint3 tid{};
    int warp = 0, lane = 0;
    unsigned shuffles = 0;  // this lane's count, whose parity picks the exchange slots
    char* stack = nullptr;
};

struct Launch {
    const char* name;
    dim3 grid, block;
    uint3 bidx{};
    void (*body)(void*);
    void* ctx;
    std::vector<Fiber> fibers;
    Fiber* cur = nullptr;
    jmp_buf sched;
    int live = 0, at_block = 0;
    std::vector<int> warp_live, warp_lanes, at_warp;
    std::vector<uint64_t> slots;  // [warp][parity][lane]
    std::string error;
    char* stacks = nullptr;
    size_t stacks_len = 0;
};

thread_local Launch* L = nullptr;

void fail(const std::string& what) {
    if (L->error.empty()) L->error = what;
}

std::string where(const Fiber& f) {
    char b[128];
    snprintf(b, sizeof b, "block (%u, %u, %u) thread (%u, %u, %u)", L->bidx.x, L->bidx.y, L->bidx.z, f.tid.x,
             f.tid.y, f.tid.z);
    return b;
}

void yield() {
    Fiber* f = L->cur;
    if (!_setjmp(f->jb)) _longjmp(L->sched, 1);
}

void fiber_main() {
    Fiber* f = L->cur;
    L->body(L->ctx);
    f->state = State::Done;
    --L->live;
    --L->warp_live[f->warp];
    _longjmp(L->sched, 1);
}

// Opens the barriers that every live thread (lane) has reached.
void release(int warp) {
    if (L->at_warp[warp] > 0 && L->at_warp[warp] == L->warp_live[warp]) {
        if (L->warp_live[warp] < L->warp_lanes[warp])
            fail("__shfl_xor_sync with the full mask in warp " + std::to_string(warp) + " of " +
                 where(L->fibers[warp * WARP]) + "'s block after " +
                 std::to_string(L->warp_lanes[warp] - L->warp_live[warp]) + " of its lanes returned");
        for (int i = warp * WARP; i < warp * WARP + L->warp_lanes[warp]; ++i)
            if (L->fibers[i].state == State::AtWarpBarrier) L->fibers[i].state = State::Ready;
        L->at_warp[warp] = 0;
    }
    if (L->at_block > 0 && L->at_block == L->live) {
        for (auto& f : L->fibers)
            if (f.state == State::AtBlockBarrier) f.state = State::Ready;
        L->at_block = 0;
    }
}

bool run_block(bool reverse) {
    const int n = (int)L->fibers.size();
    for (int i = 0; i < n; ++i) {
        Fiber& f = L->fibers[i];
        f.started = false;
        f.state = State::Ready;
        f.shuffles = 0;
    }
    L->live = n;
    L->at_block = 0;
    for (size_t w = 0; w < L->warp_lanes.size(); ++w) {
        L->warp_live[w] = L->warp_lanes[w];
        L->at_warp[w] = 0;
    }
    while (L->live > 0) {
        bool ran = false;
        for (int j = 0; j < n; ++j) {
            Fiber& f = L->fibers[reverse ? n - 1 - j : j];
            if (f.state != State::Ready) continue;
            ran = true;
            L->cur = &f;
            if (!_setjmp(L->sched)) {
                if (!f.started) {
                    f.started = true;
                    getcontext(&f.uc);
                    f.uc.uc_stack.ss_sp = f.stack;
                    f.uc.uc_stack.ss_size = STACK;
                    f.uc.uc_link = nullptr;
                    makecontext(&f.uc, fiber_main, 0);
                    setcontext(&f.uc);
                } else {
                    _longjmp(f.jb, 1);
                }
            }
            L->cur = nullptr;
            release(f.warp);
        }
        if (!ran && L->live > 0) {
            // Each kind of barrier with how many wait there and the first of them.
            std::string s = "no thread can go on (a barrier some threads never reach):";
            for (State st : {State::AtBlockBarrier, State::AtWarpBarrier}) {
                const Fiber* first = nullptr;
                int count = 0;
                for (auto& f : L->fibers)
                    if (f.state == st && count++ == 0) first = &f;
                if (first)
                    s += " " + std::to_string(count) +
                         (st == State::AtBlockBarrier ? " at __syncthreads" : " at a warp shuffle") +
                         " (the first: " + where(*first) + ");";
            }
            fail(s);
            return false;
        }
    }
    return true;
}

struct sigaction previous_segv, previous_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    if (L) {
        char b[512];
        const Fiber* f = L->cur;
        int len = snprintf(b, sizeof b,
                           "arqon-kernels-emu: invalid access to %p in kernel %s, block (%u, %u, %u) thread "
                           "(%u, %u, %u): past a buffer's end, or a fiber's stack overflowed\n",
                           info->si_addr, L->name, L->bidx.x, L->bidx.y, L->bidx.z, f ? f->tid.x : 0,
                           f ? f->tid.y : 0, f ? f->tid.z : 0);
        if (len > 0) (void)!write(2, b, (size_t)len);
    }
    // Back to what was there (Rust's handler, or the default) for the access to fault again.
    sigaction(sig, sig == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
    (void)uctx;
}

void install_fault_report() {
    static const bool done = [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
        return true;
    }();
    (void)done;
}

}  // namespace

const uint3& thread_idx() { return L->cur->tid; }
const uint3& block_idx() { return L->bidx; }
const dim3& block_dim() { return L->block; }
const dim3& grid_dim() { return L->grid; }

void syncthreads() {
    Fiber* f = L->cur;
    f->state = State::AtBlockBarrier;
    ++L->at_block;
    yield();
}

uint64_t shfl_xor_bits(unsigned int mask, uint64_t bits, int mask_lane) {
    Fiber* f = L->cur;
    if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask, which the emulator does not model");
    const size_t base = ((size_t)f->warp * 2 + (f->shuffles & 1)) * WARP;
    ++f->shuffles;
    L->slots[base + f->lane] = bits;
    f->state = State::AtWarpBarrier;
    ++L->at_warp[f->warp];
    yield();
    const int other = f->lane ^ (mask_lane & (WARP - 1));
    if (other >= L->warp_lanes[f->warp]) {
        fail("__shfl_xor_sync from a lane past the block's last thread");
        return bits;
    }
    return L->slots[base + other];
}

}  // namespace arqon_emu

using namespace arqon_emu;

// Runs `body(ctx)` as every thread of a `grid` x `block` launch named `name`;
// `reverse` runs each block's fibers from the last. 0 on success; otherwise
// the error, NUL-terminated, in `err` (of `err_len` bytes), and -1.
extern "C" __attribute__((visibility("default"))) int arqon_emu_launch(const char* name, const unsigned grid[3],
                                                                       const unsigned block[3], int reverse,
                                                                       void (*body)(void*), void* ctx, char* err,
                                                                       size_t err_len) {
    install_fault_report();
    Launch l;
    l.name = name;
    l.grid = dim3{grid[0], grid[1], grid[2]};
    l.block = dim3{block[0], block[1], block[2]};
    l.body = body;
    l.ctx = ctx;
    const size_t threads = (size_t)block[0] * block[1] * block[2];
    auto report = [&](const std::string& e) {
        snprintf(err, err_len, "%s: %s", name, e.c_str());
        return -1;
    };
    if (threads == 0 || threads > 1024) return report("a block of " + std::to_string(threads) + " threads");
    if (grid[1] > 65535 || grid[2] > 65535 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0)
        return report("a grid past CUDA's limits");
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    l.stacks_len = threads * (STACK + page);
    void* mem = mmap(nullptr, l.stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) return report("no memory for the fibers' stacks");
    l.stacks = (char*)mem;
    l.fibers.resize(threads);
    const int warps = (int)((threads + WARP - 1) / WARP);
    l.warp_live.assign(warps, 0);
    l.at_warp.assign(warps, 0);
    l.warp_lanes.assign(warps, 0);
    l.slots.assign((size_t)warps * 2 * WARP, 0);
    for (size_t i = 0; i < threads; ++i) {
        Fiber& f = l.fibers[i];
        char* base = l.stacks + i * (STACK + page);
        mprotect(base, page, PROT_NONE);  // below the stack: an overflow faults
        f.stack = base + page;
        f.tid = uint3{(unsigned)(i % block[0]), (unsigned)(i / block[0] % block[1]),
                      (unsigned)(i / ((size_t)block[0] * block[1]))};
        f.warp = (int)(i / WARP);
        f.lane = (int)(i % WARP);
        ++l.warp_lanes[f.warp];
    }
    Launch* outer = L;
    L = &l;
    bool ok = true;
    // Reversed, the blocks run last to first as well: a block that reads what another writes (a race
    // between blocks on a GPU) then sees the other value too.
    auto at = [&](unsigned i, unsigned n) { return reverse ? n - 1 - i : i; };
    for (unsigned z = 0; ok && z < grid[2]; ++z)
        for (unsigned y = 0; ok && y < grid[1]; ++y)
            for (unsigned x = 0; ok && x < grid[0]; ++x) {
                l.bidx = uint3{at(x, grid[0]), at(y, grid[1]), at(z, grid[2])};
                ok = run_block(reverse != 0) && l.error.empty();
            }
    L = outer;
    munmap(l.stacks, l.stacks_len);
    if (!l.error.empty()) return report(l.error);
    return 0;
}

// Device memory: `bytes` ending exactly where an inaccessible page begins,
// filled with 0xff bytes (NaN in every float type, -1 in every int), so a
// kernel that reads one element past the end faults and one that leaves an
// output element unwritten shows it. The start is as aligned as `bytes` is
// (16 bytes when `bytes` is a multiple of 16), so vector loads go where the
// kernels' own alignment tests let them.
static size_t pages_for(size_t bytes, size_t page) { return (bytes + page - 1) / page; }

extern "C" __attribute__((visibility("default"))) void* arqon_emu_alloc(size_t bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t pages = pages_for(bytes, page);
    void* mem = mmap(nullptr, (pages + 1) * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return nullptr;
    char* guard = (char*)mem + pages * page;
    mprotect(guard, page, PROT_NONE);
    memset(guard - bytes, 0xff, bytes);
    return guard - bytes;
}

extern "C" __attribute__((visibility("default"))) void arqon_emu_free(void* p, size_t bytes) {
    if (!p) return;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t pages = pages_for(bytes, page);
    char* guard = (char*)p + bytes;
    munmap(guard - pages * page, (pages + 1) * page);
}
