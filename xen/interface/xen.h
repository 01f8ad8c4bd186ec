/* Stand-in for the kernel-internal <xen/interface/xen.h>.
 *
 * The uapi headers <xen/privcmd.h> and <xen/gntdev.h> (linux-libc-dev) use three
 * types that only the kernel's own, non-exported xen/interface/xen.h defines, so
 * they do not compile in user space on their own.  The repository root is on the
 * compiler's include path (setup.py), which makes this file the one
 * <xen/privcmd.h> finds.  The definitions follow the Xen public ABI:
 * domid_t is 16 bits, grant_ref_t 32 bits, and xen_pfn_t is `unsigned long` on
 * x86 and 64 bits on Arm (xen/include/public/arch-*.h).
 */
#ifndef VHD_XEN_INTERFACE_XEN_H
#define VHD_XEN_INTERFACE_XEN_H
#include <stdint.h>
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#if defined(__i386__) || defined(__x86_64__)
typedef unsigned long xen_pfn_t;
#else
typedef uint64_t xen_pfn_t;
#endif
#endif
