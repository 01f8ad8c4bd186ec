/* The kernel's random number generator through the vDSO (Linux >= 6.11).
 *
 * getrandom(2) without a system call: the vDSO function runs the kernel's
 * ChaCha20 generator in user space over a per-thread opaque state, reseeded
 * by the kernel, with the guarantees of the system call (the state is wiped on
 * fork and may be dropped under memory pressure; the function then falls back
 * to the system call by itself).  glibc only uses it from 2.41 on, so we find
 * the symbol ourselves: the vDSO is an ELF image whose address the kernel
 * passes in the auxiliary vector (AT_SYSINFO_EHDR).
 *
 * Interface (kernel documentation of vgetrandom):
 *   ssize_t fn(void *buf, size_t len, unsigned int flags,
 *              void *opaque_state, size_t opaque_len);
 * returns the bytes written or a negative errno.  Called with buf NULL, len 0,
 * flags 0 and opaque_len ~0, it instead fills *opaque_state with
 * struct vq_vgetrandom_params: how large one state is and how to mmap it.
 * A state must not be used by two threads at once: each thread gets its own,
 * kept in thread-specific data and unmapped when the thread ends.
 */
#ifndef VQ_VDSO_GETRANDOM_H
#define VQ_VDSO_GETRANDOM_H

#include <elf.h>
#include <errno.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef GRND_NONBLOCK
#define GRND_NONBLOCK 0x0001
#endif
#ifndef GRND_INSECURE
#define GRND_INSECURE 0x0004
#endif

typedef ssize_t (*vq_vgetrandom_fn)(void *, size_t, unsigned int, void *, size_t);

struct vq_vgetrandom_params {
    uint32_t size_of_opaque_state;
    uint32_t mmap_prot;
    uint32_t mmap_flags;
    uint32_t reserved[13];
};

static vq_vgetrandom_fn vq_vgr_fn;
static struct vq_vgetrandom_params vq_vgr_params;
static size_t vq_vgr_map_len;
static pthread_key_t vq_vgr_key;
static pthread_once_t vq_vgr_once = PTHREAD_ONCE_INIT;
static int vq_vgr_disabled;         /* tests: behave as if the vDSO had none */

/* Address of the defined function `name` in the vDSO, or NULL. */
static void *vq_vdso_sym(const char *name)
{
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)getauxval(AT_SYSINFO_EHDR);
    if (!eh || memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0)
        return NULL;
    const ElfW(Phdr) *ph = (const ElfW(Phdr) *)((const char *)eh + eh->e_phoff);
    uintptr_t bias = 0;
    int have_load = 0;
    const ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < eh->e_phnum; i++) {
        if (ph[i].p_type == PT_LOAD && !have_load) {
            bias = (uintptr_t)eh + ph[i].p_offset - ph[i].p_vaddr;
            have_load = 1;
        } else if (ph[i].p_type == PT_DYNAMIC) {
            dyn = (const ElfW(Dyn) *)((const char *)eh + ph[i].p_offset);
        }
    }
    if (!have_load || !dyn)
        return NULL;
    const ElfW(Sym) *syms = NULL;
    const char *strs = NULL;
    const uint32_t *hash = NULL;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        uintptr_t p = dyn->d_un.d_ptr + bias;
        switch (dyn->d_tag) {
        case DT_SYMTAB: syms = (const ElfW(Sym) *)p; break;
        case DT_STRTAB: strs = (const char *)p; break;
        case DT_HASH: hash = (const uint32_t *)p; break;
        default: break;
        }
    }
    /* The symbol count is DT_HASH's nchain; the kernel links every vDSO with a
     * SysV hash table (--hash-style=sysv or both). */
    if (!syms || !strs || !hash)
        return NULL;
    for (size_t i = 0; i < hash[1]; i++) {
        const ElfW(Sym) *s = &syms[i];
        int bind = ELF64_ST_BIND(s->st_info);  /* same bits in ELF32 */
        if (ELF64_ST_TYPE(s->st_info) != STT_FUNC || s->st_shndx == SHN_UNDEF ||
            (bind != STB_GLOBAL && bind != STB_WEAK))
            continue;
        if (strcmp(strs + s->st_name, name) == 0)
            return (void *)(s->st_value + bias);
    }
    return NULL;
}

static void vq_vgr_free(void *state)
{
    munmap(state, vq_vgr_map_len);
}

static void vq_vgr_init(void)
{
    /* x86-64, arm64, loongarch, ppc, s390 name it one of these. */
    static const char *const names[] = {"__vdso_getrandom", "__kernel_getrandom"};
    vq_vgetrandom_fn fn = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !fn; i++)
        fn = (vq_vgetrandom_fn)vq_vdso_sym(names[i]);
    if (!fn)
        return;
    struct vq_vgetrandom_params p;
    memset(&p, 0, sizeof p);
    if (fn(NULL, 0, 0, &p, ~(size_t)0) != 0 || p.size_of_opaque_state == 0)
        return;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || p.size_of_opaque_state > (uint32_t)page)
        return;
    if (pthread_key_create(&vq_vgr_key, vq_vgr_free) != 0)
        return;
    vq_vgr_params = p;
    /* One state per thread, alone on its page (a state must not cross one). */
    vq_vgr_map_len = (size_t)page;
    vq_vgr_fn = fn;
}

/* 1 if this kernel's vDSO offers getrandom, else 0. */
static int vq_getrandom_vdso(void)
{
    pthread_once(&vq_vgr_once, vq_vgr_init);
    return vq_vgr_fn != NULL && !vq_vgr_disabled;
}

static void vq_getrandom_disable_vdso(int disabled)
{
    vq_vgr_disabled = disabled;
}

/* getrandom(buf, len, flags): through the vDSO when it has the function and this
 * thread's state could be mapped, else the system call.  The bytes written, or
 * -1 with errno set. */
static ssize_t vq_getrandom(void *buf, size_t len, unsigned int flags)
{
    ssize_t r;
    if (vq_getrandom_vdso()) {
        void *state = pthread_getspecific(vq_vgr_key);
        if (!state) {
            state = mmap(NULL, vq_vgr_map_len, (int)vq_vgr_params.mmap_prot,
                         (int)vq_vgr_params.mmap_flags, -1, 0);
            if (state == MAP_FAILED)
                state = NULL;
            else if (pthread_setspecific(vq_vgr_key, state) != 0) {
                munmap(state, vq_vgr_map_len);
                state = NULL;
            }
        }
        if (state) {
            r = vq_vgr_fn(buf, len, flags, state, vq_vgr_params.size_of_opaque_state);
            if (r < 0) {
                errno = (int)-r;
                return -1;
            }
            return r;
        }
    }
    return syscall(SYS_getrandom, buf, len, flags);
}

#endif
