/* The Linux uapi Xen headers, made includable from user space (see
 * xen/interface/xen.h).  <stddef.h> and <sys/ioctl.h> come first because the
 * headers use size_t and _IOC() without including them. */
#ifndef VHD_XEN_UAPI_H
#define VHD_XEN_UAPI_H
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/types.h>
#include <xen/interface/xen.h>
#include <xen/privcmd.h>
#include <xen/gntdev.h>
#endif
