// The emulator's runtime: fibers (x86-64 context switch), the per-block scheduler with its
// barrier and warp-exchange bookkeeping, shared memory (an arena per OS thread), guarded
// allocations, and the C entry points the Rust side calls (`kernels/src/cuda/emu.rs`). See
// `emu.h` for what is emulated.
#include "emu.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace emu {

thread_local Fiber* tl_fiber = nullptr;
thread_local Launch* tl_launch = nullptr;

namespace {

extern "C" void tollgate_emu_switch(void** save_sp, void* to_sp);
// Saves the callee-saved registers on the current stack, stores its pointer in *save_sp,
// switches to to_sp and restores the registers saved there.
asm(R"(
    .text
    .p2align 4
    .local tollgate_emu_switch
    .type tollgate_emu_switch, @function
tollgate_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tollgate_emu_switch, .-tollgate_emu_switch
)");

constexpr size_t STACK = 256 << 10;  // per fiber, with a guard page below
constexpr unsigned MAX_THREADS = 1024;

// Words per lane a warp_gather carries.
constexpr int GATHER_WORDS = 4;

struct Warp {
    unsigned live, count;
    unsigned long gen;
    uint64_t vals[2][32];
    unsigned long stamp[2][32];
    uint64_t wide[2][32][GATHER_WORDS];  // warp_gather's words, by generation parity
};

struct Block {
    Fiber* fibers;
    unsigned n, live, bar_count;
    unsigned long bar_gen, progress;
    // Where the barrier now filling is (its first thread's `__syncthreads`), and that thread.
    const char* bar_file;
    unsigned bar_line, bar_first;
    Warp warps[MAX_THREADS / 32];
    const char* error;
    void (*call)(void**);
    void** args;
    void* sched_sp;
};

thread_local Block* tl_block = nullptr;

// Shared memory (emu.h's `shared_var`): every declaration a slot of one layout, laid over
// an arena per OS thread that launches (reserved address space, touched where used).
constexpr size_t ARENA = 8 << 20;
std::mutex slots_lock;
size_t slots_end = 0;
unsigned slots_count = 0;
#ifdef TOLLGATE_EMU_RACECHECK
std::vector<SharedSlot> slots;  // every declaration's, for racecheck's reports
#endif

struct Arena {
    char* base = nullptr;
    std::vector<unsigned long> stamp;  // per slot: the block that last poisoned it
    ~Arena() {
        if (base) munmap(base, ARENA);
    }
};
thread_local Arena tl_arena;
thread_local char* tl_arena_base = nullptr;  // tl_arena.base once mapped
// The running block's number on this OS thread (every block of every launch its own).
thread_local unsigned long tl_block_serial = 0;

struct Stacks {
    std::vector<char*> bases;
    ~Stacks() {
        for (char* b : bases) munmap(b, STACK);
    }
    // The stack of fiber i (mapped on first use, kept for the thread's later launches).
    char* get(unsigned i) {
        while (bases.size() <= i) {
            void* m = mmap(nullptr, STACK, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) return nullptr;
            mprotect(m, (size_t)sysconf(_SC_PAGESIZE), PROT_NONE);
            bases.push_back((char*)m);
        }
        return bases[i];
    }
};
thread_local Stacks tl_stacks;

void yield() { tollgate_emu_switch(&tl_fiber->sp, tl_block->sched_sp); }

// While waiting at a warp shuffle: runs the next unfinished lane of the warp directly
// (it either reaches the shuffle too or yields to the scheduler at a barrier), so that a
// shuffle costs one switch per lane rather than a trip through the scheduler's round.
void pass_in_warp() {
    Block& b = *tl_block;
    Fiber* me = tl_fiber;
    unsigned base = me->linear & ~31u, lane = me->linear & 31u;
    for (unsigned k = 1; k < 32; ++k) {
        unsigned j = base + ((lane + k) & 31u);
        if (j >= b.n || b.fibers[j].done) continue;
        tl_fiber = &b.fibers[j];
        tollgate_emu_switch(&me->sp, b.fibers[j].sp);
        return;  // resumed: tl_fiber is `me` again (set by whoever switched back)
    }
    yield();
}

void release_barrier(Block& b) {
    b.bar_count = 0;
    b.bar_gen++;
}

[[noreturn]] void fiber_main() {
    Block& b = *tl_block;
    b.call(b.args);
    Fiber* f = tl_fiber;
    f->done = true;
    b.progress++;
    b.live--;
    if (b.bar_count && b.bar_count == b.live) release_barrier(b);
    Warp& w = b.warps[f->linear / 32];
    w.live--;
    if (w.count && w.count == w.live) {
        w.count = 0;
        w.gen++;
    }
    tollgate_emu_switch(&f->sp, b.sched_sp);
    __builtin_trap();  // a finished fiber is never resumed
}

// A fresh stack whose first switch "returns" into fiber_main with the stack aligned as
// at a function's entry.
void* fresh_sp(char* base) {
    uintptr_t top = ((uintptr_t)(base + STACK)) & ~(uintptr_t)15;
    void** sp = (void**)(top - 8 * sizeof(void*));  // 16-byte aligned
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;     // r15 r14 r13 r12 rbx rbp
    sp[6] = (void*)&fiber_main;                      // ret target
    sp[7] = nullptr;                                 // fiber_main's "return address"
    return sp;
}

struct Rng {
    uint64_t s;
    uint64_t next() {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        return s * 0x2545F4914F6CDD1Dull;
    }
};

// What runs now on this thread, for the fault handler's message.
thread_local const char* tl_kernel = nullptr;

// The handlers the fault handler stands in front of (Rust's stack-overflow report, or the
// default action).
struct sigaction old_segv, old_bus;

// A kernel reading or writing outside its buffers faults (buffers end against an
// inaccessible page); say which kernel, block and thread, then hand the fault to the
// handler that was there before: returning re-runs the access, which faults again.
void on_fault(int sig, siginfo_t* info, void*) {
    if (tl_kernel && tl_fiber && tl_launch) {
        char msg[256];
        int n = snprintf(msg, sizeof msg,
                         "CUDA emulator: kernel %s, block (%u, %u, %u), thread (%u, %u, %u): "
                         "invalid access at %p (outside its buffers)\n",
                         tl_kernel, tl_launch->block_idx.x, tl_launch->block_idx.y,
                         tl_launch->block_idx.z, tl_fiber->tid.x, tl_fiber->tid.y,
                         tl_fiber->tid.z, info->si_addr);
        if (n > 0) {
            ssize_t w = write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
            (void)w;
        }
    }
    sigaction(sig, sig == SIGBUS ? &old_bus : &old_segv, nullptr);
}

void install_fault_handler() {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    // On the alternate stack where the thread has one (a fault may be a stack overflow).
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
}

}  // namespace

thread_local char barrier_message[512];

void syncthreads(const char* file, unsigned line) {
    Block& b = *tl_block;
    unsigned long g = b.bar_gen;
    b.progress++;
    if (b.bar_count == 0) {
        b.bar_file = file, b.bar_line = line, b.bar_first = tl_fiber->linear;
    } else if (line != b.bar_line || strcmp(file, b.bar_file) != 0) {
        snprintf(barrier_message, sizeof barrier_message,
                 "divergent barriers: thread %u waits at %s:%u while thread %u waits at %s:%u "
                 "(a block's threads must meet at the same __syncthreads; undefined on a GPU)",
                 tl_fiber->linear, file, line, b.bar_first, b.bar_file, b.bar_line);
        fail(barrier_message);
    }
    if (++b.bar_count == b.live) {
        release_barrier(b);
        return;
    }
    while (b.bar_gen == g) yield();
}

// Marks `lane` as having published its values for round g of warp w, and returns once
// every live lane of the warp has (the last to arrive opens the next round).
static void arrive_in_warp(Block& b, Warp& w, unsigned lane, unsigned long g) {
    w.stamp[g & 1][lane] = g + 1;
    b.progress++;
    if (++w.count == w.live) {
        w.count = 0;
        w.gen++;
    } else {
        while (w.gen == g) pass_in_warp();
    }
}

uint64_t warp_exchange(uint64_t bits, int src) {
    Block& b = *tl_block;
    Fiber* f = tl_fiber;
    Warp& w = b.warps[f->linear / 32];
    unsigned lane = f->linear & 31u;
    unsigned long g = w.gen;
    w.vals[g & 1][lane] = bits;
    arrive_in_warp(b, w, lane, g);
    if (src < 0 || src > 31 || w.stamp[g & 1][src] != g + 1)
        fail("a warp shuffle reads a lane that did not take part in it");
    return w.vals[g & 1][src];
}

const uint64_t* warp_gather(const uint64_t* words, int n) {
    if (n < 0 || n > GATHER_WORDS) fail("a warp gather of too many words");
    Block& b = *tl_block;
    Fiber* f = tl_fiber;
    Warp& w = b.warps[f->linear / 32];
    unsigned lane = f->linear & 31u;
    unsigned long g = w.gen;
    for (int i = 0; i < n; ++i) w.wide[g & 1][lane][i] = words[i];
    arrive_in_warp(b, w, lane, g);
    for (int l = 0; l < 32; ++l)
        if (w.stamp[g & 1][l] != g + 1) fail("a warp gather some lanes did not take part in");
    // Valid until this lane's next exchange or gather (the other parity's turn).
    return &w.wide[g & 1][0][0];
}

SharedSlot reserve_shared(size_t bytes, size_t align, const char* name) {
    std::lock_guard<std::mutex> hold(slots_lock);
    size_t offset = (slots_end + align - 1) & ~(align - 1);
    if (offset + bytes > ARENA) {
        fprintf(stderr, "CUDA emulator: the kernels' shared memory is more than its %zu-byte arena\n",
                ARENA);
        abort();
    }
    slots_end = offset + bytes;
    SharedSlot slot{offset, bytes, slots_count++, name};
#ifdef TOLLGATE_EMU_RACECHECK
    slots.push_back(slot);
#endif
    return slot;
}

char* shared_at(const SharedSlot& slot) {
    Arena& a = tl_arena;
    if (!a.base) {
        void* m = mmap(nullptr, ARENA, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) fail("out of memory for shared memory");
        a.base = tl_arena_base = (char*)m;
    }
    if (a.stamp.size() <= slot.index) a.stamp.resize(slot.index + 1, 0);
    if (a.stamp[slot.index] != tl_block_serial) {
        memset(a.base + slot.offset, 0xff, slot.bytes);
        a.stamp[slot.index] = tl_block_serial;
    }
    return a.base + slot.offset;
}

void fail(const char* why) {
    Block& b = *tl_block;
    if (!b.error) b.error = why;
    tl_fiber->done = true;  // abandoned: the launch fails, its fibers are not resumed
    tollgate_emu_switch(&tl_fiber->sp, b.sched_sp);
    __builtin_trap();
}

}  // namespace emu

using namespace emu;

#ifdef TOLLGATE_EMU_UB_CHECKS
// What faults or is undefined on a GPU but runs through on the host: build.rs compiles the
// emulator with `-fsanitize=alignment,bounds,shift` and no recovery, so that the compiler
// checks every access through a pointer for its type's alignment (a misaligned `uint4`
// load is CUDA_ERROR_MISALIGNED_ADDRESS on a GPU, and kills its context), every index into
// an array of known size (a thread's register arrays), and every shift's width, and calls
// these on a violation. In a kernel, the launch fails with where and what; elsewhere, the
// process aborts with it. (The same entry points and data as the compilers' sanitizer
// runtime, without that library: the emulator links into every binary.)
namespace {

struct UbLocation {
    const char* file;
    uint32_t line, column;
};

// A type as the compiler describes it: its kind (0 integer, 1 float), for an integer
// log2 of its width times 2 plus whether it is signed, then its name (quoted).
struct UbType {
    uint16_t kind, info;
    char name[1];
};

struct UbTypeMismatch {
    UbLocation loc;
    const UbType* type;
    unsigned char log_alignment, check_kind;
};

struct UbOutOfBounds {
    UbLocation loc;
    const UbType* array;
    const UbType* index;
};

struct UbShift {
    UbLocation loc;
    const UbType* lhs;
    const UbType* rhs;
};

thread_local char ub_message[512];

// An integer the compiler passed inline (as wide as a pointer at most) as its type says.
long long ub_int(const UbType* t, uintptr_t v) {
    unsigned width = 1u << (t->info >> 1);
    if (!(t->info & 1) || width >= 64) return (long long)v;
    unsigned extra = 64 - width;
    return (long long)((uint64_t)v << extra) >> extra;
}

[[noreturn]] void ub_report(const UbLocation& at) {
    if (tl_fiber && tl_launch) {
        char what[400];
        snprintf(what, sizeof what, "%s", ub_message);
        snprintf(ub_message, sizeof ub_message, "thread (%u, %u, %u), %s:%u: %s",
                 tl_fiber->tid.x, tl_fiber->tid.y, tl_fiber->tid.z, at.file, at.line, what);
        fail(ub_message);
    }
    fprintf(stderr, "CUDA emulator: %s:%u: %s\n", at.file, at.line, ub_message);
    abort();
}

}  // namespace

extern "C" {

[[noreturn]] void __ubsan_handle_type_mismatch_v1_abort(UbTypeMismatch* d, uintptr_t p) {
    const char* kinds[] = {"load of", "store to", "reference bound to", "member access at"};
    const char* kind = d->check_kind < 4 ? kinds[d->check_kind] : "access at";
    snprintf(ub_message, sizeof ub_message,
             "misaligned %s %p as %s, which needs %u-byte alignment (a fault on a GPU)", kind,
             (void*)p, d->type->name, 1u << d->log_alignment);
    ub_report(d->loc);
}

[[noreturn]] void __ubsan_handle_out_of_bounds_abort(UbOutOfBounds* d, uintptr_t index) {
    snprintf(ub_message, sizeof ub_message, "index %lld out of the bounds of %s",
             ub_int(d->index, index), d->array->name);
    ub_report(d->loc);
}

[[noreturn]] void __ubsan_handle_shift_out_of_bounds_abort(UbShift* d, uintptr_t lhs,
                                                           uintptr_t rhs) {
    snprintf(ub_message, sizeof ub_message,
             "shift of %lld (%s) by %lld (%s): past its width, or a signed one overflowing",
             ub_int(d->lhs, lhs), d->lhs->name, ub_int(d->rhs, rhs), d->rhs->name);
    ub_report(d->loc);
}

}  // extern "C"
#endif

#ifdef TOLLGATE_EMU_RACECHECK
// Racecheck on the CPU: where TOLLGATE_EMU_RACECHECK=1, build.rs compiles the emulator with
// `-fsanitize=thread`, so that the compiler calls these before every load and store (they
// stand in for ThreadSanitizer's runtime: the emulator links none, as with the UB checks
// above). Two accesses to a byte of which one writes, by different threads, with nothing
// ordering them, are a hazard on a GPU, where their order is not defined, and fail the
// launch naming the place and the threads:
// - in the block's shared memory (compute-sanitizer's racecheck), ordered by a barrier
//   (`__syncthreads`) between them, or for two lanes of one warp a shuffle they both took
//   part in;
// - in global memory (the emulator's buffers, which compute-sanitizer does not check), the
//   same within a block, and across two blocks of a launch — which a GPU runs in any order,
//   at once or one after another, where the emulator runs them one at a time in a shuffled
//   order — only by an atomic: a block's accesses before an atomic on a word (its release)
//   are ordered before another block's after a later atomic on the same word (its acquire),
//   as `last_to_arrive` in common.cuh publishes a split result's parts to the block that
//   merges them (the `__threadfence`s it needs are assumed, not checked). A buffer is
//   watched from the first access a kernel makes to it, or where it is over 1 MiB from the
//   first write (so a model's weights, never written by a kernel, never are; reads before
//   it in that launch go unchecked), at a granule of 2 bytes (no kernel writes single bytes to global memory); launches are ordered one after
//   another (a stream's, and each kernel begins waiting for the one before: `pdl_begin`).
// Atomics themselves are not checked (`EMU_UNCHECKED` in emu.h).
namespace {

#define NO_TSAN __attribute__((no_sanitize_thread))

// A byte's last write and the reads since, in block `block` of this OS thread (an older
// block's are stale): each its thread (linear index + 1; 0: none; MANY: several readers),
// barrier generation and warp generation (for several readers, the latest), and the
// readers' warp (MANY: more than one warp).
struct Shadow {
    uint32_t block;
    uint16_t wtid, rtid;
    uint32_t wbar, wwarp, rbar, rwarp;
    uint16_t rwarpidx, unused[3];
};
constexpr uint16_t MANY = 0xffff;
thread_local Shadow* tl_shadow = nullptr;  // a Shadow per byte of the arena
thread_local char race_message[512];

// The access being checked: its thread (linear index + 1), warp, and the generations of
// the block's barrier and of its warp's shuffles.
struct Access {
    unsigned tid, warp;
    uint32_t bar, wgen;
};

// Whether an earlier access by thread `t` at generations (bar, wgen) is ordered before `a`:
// the same thread, a barrier between, or a shuffle of their warp between.
NO_TSAN bool ordered(unsigned t, uint32_t bar, uint32_t wgen, const Access& a) {
    if (t == 0 || t == a.tid || bar != a.bar) return true;
    return t != MANY && (t - 1) / 32 == a.warp && wgen != a.wgen;
}

[[noreturn]] NO_TSAN void race(size_t off, const Access& a, bool write, unsigned other,
                               bool other_wrote) {
    const char* var = "?";
    size_t at = off;
    {
        std::lock_guard<std::mutex> hold(slots_lock);
        for (const SharedSlot& sl : slots)
            if (off >= sl.offset && off < sl.offset + sl.bytes) {
                var = sl.name;
                at = off - sl.offset;
                break;
            }
    }
    char who[32];
    if (other == MANY) snprintf(who, sizeof who, "other threads");
    else snprintf(who, sizeof who, "thread %u", other - 1);
    snprintf(race_message, sizeof race_message,
             "shared-memory race on `%s` (byte %zu): thread %u %s it after %s %s it with no "
             "barrier between (their order is undefined on a GPU)",
             var, at, a.tid - 1, write ? "writes" : "reads", who,
             other_wrote ? "wrote" : "read");
    fail(race_message);
}

NO_TSAN void check_shared(Block* b, Fiber* f, size_t off, size_t n, bool write) {
    if (!tl_shadow) {
        void* m = mmap(nullptr, ARENA * sizeof(Shadow), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) fail("out of memory for racecheck's shadow of shared memory");
        tl_shadow = (Shadow*)m;
    }
    unsigned warp = f->linear / 32;
    Access a{f->linear + 1, warp, (uint32_t)b->bar_gen, (uint32_t)b->warps[warp].gen};
    uint32_t blk = (uint32_t)tl_block_serial;
    for (size_t i = 0; i < n && off + i < ARENA; ++i) {
        Shadow& s = tl_shadow[off + i];
        if (s.block != blk) {
            s = Shadow{};
            s.block = blk;
        }
        if (!ordered(s.wtid, s.wbar, s.wwarp, a)) race(off + i, a, write, s.wtid, true);
        // Every read since the write ordered before this access.
        bool reads_before = s.rtid == MANY
                                ? s.rbar != a.bar || (s.rwarpidx == a.warp && s.rwarp != a.wgen)
                                : ordered(s.rtid, s.rbar, s.rwarp, a);
        if (write) {
            if (!reads_before) race(off + i, a, true, s.rtid, false);
            s.wtid = (uint16_t)a.tid, s.wbar = a.bar, s.wwarp = a.wgen, s.rtid = 0;
        } else if (reads_before) {
            s.rtid = (uint16_t)a.tid, s.rbar = a.bar, s.rwarp = a.wgen, s.rwarpidx = (uint16_t)a.warp;
        } else {
            // Readers no barrier orders: a write must come after each of them.
            if (s.rwarpidx != a.warp) s.rwarpidx = MANY;
            s.rtid = MANY;
            if (a.wgen > s.rwarp) s.rwarp = a.wgen;
        }
    }
}

// Global memory: each buffer's record, found by a table of its pages.
struct GShadow;
struct Alloc {
    char* data;
    size_t bytes;
    GShadow* shadow;  // a GShadow per 2 bytes, from the first write by a kernel (atomic)
    size_t shadow_len;
};

// Page number (4 KiB pages of a 47-bit address space) -> its buffer: 2^17 tables of 2^18
// pages, each mapped on first use. Entries change under allocs_lock; lookups read them
// with no lock (a buffer a kernel uses is not freed while it runs).
constexpr unsigned PAGE_BITS = 12, LEAF_BITS = 18, TOP = 1u << 17;
Alloc** page_tables[TOP];
std::mutex allocs_lock;

NO_TSAN Alloc* alloc_of(const void* p) {
    uintptr_t page = (uintptr_t)p >> PAGE_BITS;
    if ((page >> LEAF_BITS) >= TOP) return nullptr;
    Alloc** leaf = __atomic_load_n(&page_tables[page >> LEAF_BITS], __ATOMIC_ACQUIRE);
    if (!leaf) return nullptr;
    return __atomic_load_n(&leaf[page & ((1u << LEAF_BITS) - 1)], __ATOMIC_ACQUIRE);
}

// Points pages [from, to) at `a` (null: none). Under allocs_lock.
NO_TSAN bool set_pages(uintptr_t from, uintptr_t to, Alloc* a) {
    for (uintptr_t page = from >> PAGE_BITS; page < (to + 4095) >> PAGE_BITS; ++page) {
        if ((page >> LEAF_BITS) >= TOP) return false;
        Alloc**& leaf = page_tables[page >> LEAF_BITS];
        if (!leaf) {
            if (!a) continue;
            void* m = mmap(nullptr, sizeof(Alloc*) << LEAF_BITS, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) return false;
            __atomic_store_n(&leaf, (Alloc**)m, __ATOMIC_RELEASE);
        }
        __atomic_store_n(&leaf[page & ((1u << LEAF_BITS) - 1)], a, __ATOMIC_RELEASE);
    }
    return true;
}

// A granule's last write and the reads since, in launch `launch` (an older launch's are
// stale): each its block (linear index + 1; 0 none; for reads MANY_BLOCKS: several),
// thread (linear index + 1; MANY: several in one block), the block's barrier and the warp's
// shuffle generations (for several readers, the latest) and the block's releases before it
// (`epoch`); the readers' warp (MANY_WARPS: several).
struct GShadow {
    uint32_t launch, wblock, rblock;
    uint16_t wtid, rtid;
    uint32_t wbar, wwarp, rbar, rwarp;
    uint8_t wepoch, repoch, rwarpidx, unused;
};
constexpr uint32_t MANY_BLOCKS = 0xffffffffu;
constexpr uint8_t MANY_WARPS = 0xff;

// A block's accesses up to an epoch (its count of releases then).
struct BlockView {
    uint32_t block;  // linear index + 1
    uint8_t epoch;   // its accesses up to this epoch are ordered before ours
};
// This OS thread's running launch and block, for global racecheck (reached through a plain
// pointer, `tl_race`: the check runs inside instrumented code, where a thread_local with a
// constructor's wrapper would call the check again).
struct RaceState {
    uint32_t launch = 0, block = 0;  // block: linear index + 1
    uint8_t epoch = 0;               // releases this block made (at most 255 counted)
    std::vector<BlockView> view;     // what this block acquired
    // Per word an atomic touched in this launch: the releases made on it.
    std::unordered_map<uintptr_t, std::vector<BlockView>> released;
};
thread_local RaceState* tl_race = nullptr;
std::atomic<uint32_t> launch_serial{0};

// Whether block `blk`'s accesses at `epoch` are ordered before the running block's.
NO_TSAN bool acquired(const RaceState& r, uint32_t blk, uint8_t epoch) {
    for (const BlockView& v : r.view)
        if (v.block == blk) return epoch <= v.epoch;
    return false;
}

// "block (x, y, z)" for launch-linear block `blk` + 1.
NO_TSAN void block_name(char* out, size_t len, uint32_t blk) {
    const dim3& g = tl_launch->grid_dim;
    uint32_t i = blk - 1;
    snprintf(out, len, "block (%u, %u, %u)", i % g.x, i / g.x % g.y, i / g.x / g.y);
}

[[noreturn]] NO_TSAN void global_race(const Alloc& al, size_t off, const Access& a, bool write,
                                      uint32_t other_block, unsigned other, bool other_wrote) {
    char who[96];
    const RaceState& r = *tl_race;
    if (other_block == MANY_BLOCKS) {
        snprintf(who, sizeof who, "threads of other blocks");
    } else if (other_block != r.block) {
        char bn[48];
        block_name(bn, sizeof bn, other_block);
        snprintf(who, sizeof who, "%s (thread %u)", bn, other - 1);
    } else if (other == MANY) {
        snprintf(who, sizeof who, "other threads of its block");
    } else {
        snprintf(who, sizeof who, "thread %u", other - 1);
    }
    snprintf(race_message, sizeof race_message,
             "global-memory race at byte %zu of a %zu-byte buffer: thread %u %s it after %s "
             "%s it, %s",
             off, al.bytes, a.tid - 1, write ? "writes" : "reads", who,
             other_wrote ? "wrote" : "read",
             other_block == r.block
                 ? "with no barrier between (their order is undefined on a GPU)"
                 : "and no atomic orders the two blocks (a GPU runs a launch's blocks in any "
                   "order)");
    fail(race_message);
}

// Buffers up to this size are watched from the first access of a kernel, larger ones from
// the first write (a model's weights, never written, are the large ones read).
constexpr size_t WATCH_FROM_READS = 1 << 20;

NO_TSAN void check_global(Block* b, Fiber* f, Alloc* al, size_t off, size_t n, bool write) {
    RaceState* r = tl_race;
    if (!r || !r->block) return;
    GShadow* sh = __atomic_load_n(&al->shadow, __ATOMIC_ACQUIRE);
    if (!sh) {
        if (!write && al->bytes > WATCH_FROM_READS) return;  // watched from the first write
        size_t len = (al->bytes / 2 + 1) * sizeof(GShadow);
        void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) fail("out of memory for racecheck's shadow of global memory");
        GShadow* none = nullptr;
        if (__atomic_compare_exchange_n(&al->shadow, &none, (GShadow*)m, false, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            al->shadow_len = len;
            sh = (GShadow*)m;
        } else {
            munmap(m, len);
            sh = none;
        }
    }
    unsigned warp = f->linear / 32;
    Access a{f->linear + 1, warp, (uint32_t)b->bar_gen, (uint32_t)b->warps[warp].gen};
    for (size_t g = off / 2; g <= (off + n - 1) / 2 && g * 2 < al->bytes; ++g) {
        GShadow& s = sh[g];
        if (s.launch != r->launch) {
            s = GShadow{};
            s.launch = r->launch;
        }
        if (s.wblock) {
            bool ok = s.wblock == r->block ? ordered(s.wtid, s.wbar, s.wwarp, a)
                                           : acquired(*r, s.wblock, s.wepoch);
            if (!ok) global_race(*al, g * 2, a, write, s.wblock, s.wtid, true);
        }
        // Every read since the write ordered before this access.
        bool reads_before;
        if (s.rblock == 0) reads_before = true;
        else if (s.rblock == MANY_BLOCKS) reads_before = false;
        else if (s.rblock != r->block) reads_before = acquired(*r, s.rblock, s.repoch);
        else if (s.rtid == MANY)
            reads_before = s.rbar != a.bar || (s.rwarpidx == a.warp && s.rwarp != a.wgen);
        else reads_before = ordered(s.rtid, s.rbar, s.rwarp, a);
        if (write) {
            if (!reads_before) global_race(*al, g * 2, a, true, s.rblock, s.rtid, false);
            s.wblock = r->block, s.wtid = (uint16_t)a.tid, s.wbar = a.bar, s.wwarp = a.wgen;
            s.wepoch = r->epoch, s.rblock = 0;
        } else if (reads_before) {
            s.rblock = r->block, s.rtid = (uint16_t)a.tid, s.rbar = a.bar, s.rwarp = a.wgen;
            s.repoch = r->epoch, s.rwarpidx = (uint8_t)a.warp;
        } else if (s.rblock != r->block) {
            s.rblock = MANY_BLOCKS;  // readers in several blocks: a write after them races
        } else {
            // Readers of this block no barrier orders: a write must come after each.
            if (s.rwarpidx != a.warp) s.rwarpidx = MANY_WARPS;
            s.rtid = MANY;
            if (a.wgen > s.rwarp) s.rwarp = a.wgen;
            if (r->epoch > s.repoch) s.repoch = r->epoch;
        }
    }
}

// Where `p` lies in this OS thread's shared-memory arena, or ARENA where it does not.
// (tl_arena.base through a plain pointer: tl_arena's wrapper is itself instrumented.)
NO_TSAN size_t arena_offset(const void* p) {
    char* base = tl_arena_base;
    size_t off = (size_t)((const char*)p - base);
    return base && off < ARENA ? off : ARENA;
}

NO_TSAN void check_access(const void* p, size_t n, bool write) {
    Block* b = tl_block;
    Fiber* f = tl_fiber;
    if (!b || !f || f->done || n == 0) return;
    size_t off = arena_offset(p);
    if (off < ARENA) return check_shared(b, f, off, n, write);
    if (Alloc* al = alloc_of(p)) {
        size_t at = (size_t)((const char*)p - al->data);
        if (at < al->bytes) check_global(b, f, al, at, n, write);
    }
}

thread_local std::unique_ptr<RaceState> tl_race_owner;  // tl_race's (never read in a check)

}  // namespace

namespace emu {

// An atomic on `p` by the running thread: a release of its block's accesses so far, and an
// acquire of those every block that made one on `p` before released (with what they had
// acquired). On shared memory (the block's own), nothing.
NO_TSAN void racecheck_atomic(const void* p) {
    RaceState* r = tl_race;
    if (!r || !r->block) return;
    if (arena_offset(p) < ARENA) return;
    std::vector<BlockView>& rel = r->released[(uintptr_t)p];
    for (const BlockView& v : rel) {
        bool seen = false;
        for (BlockView& mine : r->view)
            if (mine.block == v.block) {
                if (v.epoch > mine.epoch) mine.epoch = v.epoch;
                seen = true;
            }
        if (!seen && v.block != r->block) r->view.push_back(v);
    }
    rel.push_back(BlockView{r->block, r->epoch});
    for (const BlockView& v : r->view) rel.push_back(v);
    if (r->epoch < 255) r->epoch++;
}

}  // namespace emu

namespace {

// A launch begins on this OS thread (its accesses are checked against its own only).
void racecheck_launch() {
    if (!tl_race_owner) {
        tl_race_owner = std::make_unique<RaceState>();
        tl_race = tl_race_owner.get();
    }
    tl_race->launch = launch_serial.fetch_add(1) + 1;
    tl_race->released.clear();
}

// Block `linear` of the launch begins (0 once the launch is over).
void racecheck_block(uint32_t block) {
    tl_race->block = block;
    tl_race->epoch = 0;
    tl_race->view.clear();
}

// A buffer [data, data + bytes) in the mapping [map, map + len) is made or freed.
void racecheck_alloc(char* data, size_t bytes, char* map, size_t len) {
    std::lock_guard<std::mutex> hold(allocs_lock);
    Alloc* a = new Alloc{data, bytes, nullptr, 0};
    if (!set_pages((uintptr_t)map, (uintptr_t)(map + len), a)) {
        set_pages((uintptr_t)map, (uintptr_t)(map + len), nullptr);
        delete a;
    }
}

void racecheck_free(char* map, size_t len) {
    std::lock_guard<std::mutex> hold(allocs_lock);
    Alloc* a = alloc_of(map);
    set_pages((uintptr_t)map, (uintptr_t)(map + len), nullptr);
    if (!a) return;
    if (a->shadow) munmap(a->shadow, a->shadow_len);
    delete a;
}

}  // namespace

// The entry points `-fsanitize=thread` calls (GCC's; a compiler calling others fails the
// link, naming them).
extern "C" {
#define TOLLGATE_EMU_ACCESS(n)                                                          \
    NO_TSAN void __tsan_read##n(void* p) { check_access(p, n, false); }                 \
    NO_TSAN void __tsan_write##n(void* p) { check_access(p, n, true); }                 \
    NO_TSAN void __tsan_unaligned_read##n(void* p) { check_access(p, n, false); }       \
    NO_TSAN void __tsan_unaligned_write##n(void* p) { check_access(p, n, true); }
TOLLGATE_EMU_ACCESS(1)
TOLLGATE_EMU_ACCESS(2)
TOLLGATE_EMU_ACCESS(4)
TOLLGATE_EMU_ACCESS(8)
TOLLGATE_EMU_ACCESS(16)
NO_TSAN void __tsan_read_range(void* p, size_t n) { check_access(p, n, false); }
NO_TSAN void __tsan_write_range(void* p, size_t n) { check_access(p, n, true); }
NO_TSAN void __tsan_init(void) {}
NO_TSAN void __tsan_func_entry(void*) {}
NO_TSAN void __tsan_func_exit(void) {}
NO_TSAN void __tsan_vptr_update(void**, void*) {}
NO_TSAN void __tsan_vptr_read(void**) {}
// Atomics outside the kernels' own (a function-local static's guard), done as asked.
#define TOLLGATE_EMU_ATOMIC(bits, T)                                                    \
    NO_TSAN T __tsan_atomic##bits##_load(const volatile T* a, int mo) {                 \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                    \
    }                                                                                   \
    NO_TSAN void __tsan_atomic##bits##_store(volatile T* a, T v, int mo) {              \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                       \
    }                                                                                   \
    NO_TSAN T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int mo) {             \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                              \
    }                                                                                   \
    NO_TSAN int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, \
                                                              int mo, int fmo) {        \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST,            \
                                           __ATOMIC_SEQ_CST);                           \
    }
TOLLGATE_EMU_ATOMIC(8, uint8_t)
TOLLGATE_EMU_ATOMIC(16, uint16_t)
TOLLGATE_EMU_ATOMIC(32, uint32_t)
TOLLGATE_EMU_ATOMIC(64, uint64_t)
NO_TSAN void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
NO_TSAN void __tsan_atomic_signal_fence(int) {}
}  // extern "C"
#else
namespace {
void racecheck_launch() {}
void racecheck_block(uint32_t) {}
void racecheck_alloc(char*, size_t, char*, size_t) {}
void racecheck_free(char*, size_t) {}
}  // namespace
#endif

extern "C" {

// Installs the fault handler (once per process; call before any launch, from one thread).
void tollgate_emu_init(void) { install_fault_handler(); }

// Runs kernel `name`'s launcher `call(args)` as a grid of grid[0..3] blocks of block[0..3] threads, each
// given `dynamic_shared` bytes of dynamic shared memory (what the kernel may take of its static area).
// Returns 0, or -1 with a message in `err`.
int tollgate_emu_launch(const char* name, void (*call)(void**), const unsigned* grid,
                        const unsigned* block, unsigned dynamic_shared, void** args,
                        uint64_t seed, char* err, size_t err_len) {
    unsigned n = block[0] * block[1] * block[2];
    auto bad = [&](const char* why) {
        snprintf(err, err_len, "%s", why);
        return -1;
    };
    if (n == 0 || n > MAX_THREADS) return bad("block size must be 1 to 1024 threads");
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return bad("empty grid");
    if (grid[1] > 65535 || grid[2] > 65535) return bad("grid y and z must be at most 65535");
    std::vector<Fiber> fibers(n);
    std::vector<char*> stacks(n);  // each fiber's, looked up once for every block
    for (unsigned i = 0; i < n; ++i)
        if (!(stacks[i] = tl_stacks.get(i))) return bad("out of memory for fiber stacks");
    Block* bp = new Block();
    Block& b = *bp;
    Launch launch;
    launch.block_dim = {block[0], block[1], block[2]};
    launch.grid_dim = {grid[0], grid[1], grid[2]};
    launch.dynamic_shared = dynamic_shared;
    Rng rng{seed * 0x9E3779B97F4A7C15ull + 1};
    uint64_t total = (uint64_t)grid[0] * grid[1] * grid[2];
    // Blocks in a rotated, possibly reversed order; threads in a fresh rotation and
    // direction each round: results must not depend on either.
    uint64_t b0 = rng.next() % total;
    bool brev = rng.next() & 1;
    int rc = 0;
    Block* saved_block = tl_block;
    Fiber* saved_fiber = tl_fiber;
    Launch* saved_launch = tl_launch;
    tl_block = bp;
    tl_launch = &launch;
    const char* saved_kernel = tl_kernel;
    tl_kernel = name;
    racecheck_launch();
    for (uint64_t k = 0; k < total && rc == 0; ++k) {
        uint64_t bi = brev ? (b0 + total - k) % total : (b0 + k) % total;
        launch.block_idx = {(unsigned)(bi % grid[0]), (unsigned)(bi / grid[0] % grid[1]),
                            (unsigned)(bi / grid[0] / grid[1])};
        b.n = n;
        b.live = n;
        b.bar_count = 0;
        b.bar_gen = 0;
        b.progress = 0;
        b.error = nullptr;
        b.call = call;
        b.args = args;
        b.fibers = fibers.data();
        ++tl_block_serial;  // its shared memory is poisoned as it reaches it
        racecheck_block((uint32_t)bi + 1);
        for (unsigned w = 0; w * 32 < n; ++w) {
            Warp& wp = b.warps[w];
            wp.live = (n - w * 32) < 32 ? n - w * 32 : 32;
            wp.count = 0;
            wp.gen = 0;
            memset(wp.stamp, 0, sizeof wp.stamp);
        }
        for (unsigned i = 0; i < n; ++i) {
            Fiber& f = fibers[i];
            f.linear = i;
            f.tid = {i % block[0], i / block[0] % block[1], i / (block[0] * block[1])};
            f.done = false;
            f.sp = fresh_sp(stacks[i]);
        }
        while (b.live > 0 && !b.error) {
            unsigned long before = b.progress;
            unsigned start = (unsigned)(rng.next() % n);
            bool rev = rng.next() & 1;
            for (unsigned k2 = 0; k2 < n && !b.error; ++k2) {
                unsigned i = rev ? (start + n - k2) % n : (start + k2) % n;
                if (fibers[i].done) continue;
                tl_fiber = &fibers[i];
                tollgate_emu_switch(&b.sched_sp, fibers[i].sp);
            }
            if (b.error) break;
            if (b.live > 0 && b.progress == before) {
                snprintf(err, err_len,
                         "deadlock in block (%u, %u, %u): %u of %u threads wait at a "
                         "barrier or warp shuffle the others never reach",
                         launch.block_idx.x, launch.block_idx.y, launch.block_idx.z, b.live, n);
                rc = -1;
                break;
            }
        }
        if (b.error) {
            snprintf(err, err_len, "block (%u, %u, %u): %s", launch.block_idx.x,
                     launch.block_idx.y, launch.block_idx.z, b.error);
            rc = -1;
        }
    }
    racecheck_block(0);
    tl_block = saved_block;
    tl_fiber = saved_fiber;
    tl_launch = saved_launch;
    tl_kernel = saved_kernel;
    delete bp;
    return rc;
}

// `bytes` of zeroed memory ending against an inaccessible page (so that an access past
// the end faults), 16-byte aligned. Returns the data pointer; `*map`/`*map_len` free it.
void* tollgate_emu_alloc(size_t bytes, void** map, size_t* map_len) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t data = (bytes + 15) & ~(size_t)15;
    size_t len = (data + page - 1) / page * page + page;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    char* guard = (char*)m + len - page;
    if (mprotect(guard, page, PROT_NONE) != 0) {
        munmap(m, len);
        return nullptr;
    }
    *map = m;
    *map_len = len;
    racecheck_alloc(guard - data, bytes, (char*)m, len);
    return guard - data;
}

void tollgate_emu_free(void* map, size_t map_len) {
    racecheck_free((char*)map, map_len);
    munmap(map, map_len);
}

}  // extern "C"
