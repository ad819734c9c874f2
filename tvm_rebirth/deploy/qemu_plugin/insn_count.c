/* Counts the guest instructions a qemu-user run executes between two markers (TCG plugin,
 * QEMU 7.x plugin API v1).
 *
 * Every translated block gets an inline add of its instruction count to one counter (exact
 * for a single-threaded guest). The guest marks the region to count with lseek(-1, MARK_START,
 * 0) and lseek(-1, MARK_STOP, 0) -- harmless failing syscalls the plugin recognises -- so
 * interpreter start-up, whose count varies run to run, stays outside. At exit the counted
 * instructions are written to `outfile=PATH`; with `segments=PATH`, also each marked region's
 * own count, one line per region in order (a per-call profile). The declarations are the few entry points of
 * QEMU's stable plugin ABI used here (Debian ships no qemu-plugin.h). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stddef.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef struct qemu_info_t qemu_info_t;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

extern void qemu_plugin_register_vcpu_tb_trans_cb(
    qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, struct qemu_plugin_tb *));
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern void qemu_plugin_register_vcpu_tb_exec_inline(
    struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr, uint64_t imm);
extern void qemu_plugin_register_atexit_cb(
    qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, void *), void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define SYS_LSEEK_AARCH64 62
#define MARK_START 0x5EB1
#define MARK_STOP 0x5EB2

extern void qemu_plugin_register_vcpu_syscall_cb(
    qemu_plugin_id_t id,
    void (*cb)(qemu_plugin_id_t, unsigned int, int64_t, uint64_t, uint64_t, uint64_t, uint64_t,
               uint64_t, uint64_t, uint64_t, uint64_t));

static uint64_t executed, started, counted;
static int counting;
static char outfile[4096], segfile[4096];
static FILE *segments;

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8) {
    if (num != SYS_LSEEK_AARCH64 || a1 != (uint64_t)-1) return;
    if (a2 == MARK_START && !counting) {
        counting = 1;
        started = executed;
    } else if (a2 == MARK_STOP && counting) {
        counting = 0;
        counted += executed - started;
        if (segments) fprintf(segments, "%llu\n", (unsigned long long)(executed - started));
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &executed,
                                             qemu_plugin_tb_n_insns(tb));
}

static void on_exit(qemu_plugin_id_t id, void *userdata) {
    if (segments) fclose(segments);
    FILE *f = fopen(outfile, "w");
    if (f) {
        fprintf(f, "%llu\n", (unsigned long long)counted);
        fclose(f);
    }
}

__attribute__((visibility("default"))) int qemu_plugin_install(
    qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "arg=", 4) == 0) arg += 4;
        if (strncmp(arg, "outfile=", 8) == 0) {
            strncpy(outfile, arg + 8, sizeof(outfile) - 1);
        } else if (strncmp(arg, "segments=", 9) == 0) {
            strncpy(segfile, arg + 9, sizeof(segfile) - 1);
        }
    }
    if (!outfile[0]) return -1;
    if (segfile[0] && !(segments = fopen(segfile, "w"))) return -1;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_exit, NULL);
    return 0;
}
