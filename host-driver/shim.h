/* SPDX-License-Identifier: GPL-2.0 */
/* Prototypes of the C shim; the Rust side declares the same in shim.rs. */
#ifndef UXEN_SHIM_H
#define UXEN_SHIM_H

#include <linux/types.h>

int uxen_param_fail_cpu(void);
bool uxen_param_require_iommu(void);
bool uxen_param_debug(void);
bool uxen_param_iommu_only(void);
bool uxen_param_log_e9(void);
unsigned long uxen_param_rsdp(void);
bool uxen_host_iommu_enabled(void);
unsigned long uxen_shim_acpi_dmar(void *buf, unsigned long max);
bool uxen_shim_la57(void);
int uxen_shim_misc_register(void);
void uxen_shim_misc_deregister(void);
int uxen_shim_vm_fd(void *priv);
void uxen_shim_on_each_cpu(void (*fn)(void *), void *info);
int uxen_shim_smp_call_single(int cpu, void (*fn)(void *), void *info);
unsigned int uxen_shim_num_online_cpus(void);
unsigned int uxen_shim_num_present_cpus(void);
int uxen_shim_cpu_online(int cpu);
int uxen_shim_nr_cpu_ids(void);
int uxen_shim_this_cpu(void);
unsigned long uxen_shim_irq_save(void);
void uxen_shim_irq_restore(unsigned long flags);
void uxen_shim_cpus_read_lock(void);
void uxen_shim_cpus_read_unlock(void);
void *uxen_shim_alloc_pages(unsigned int order);
void uxen_shim_free_pages(void *addr, unsigned int order);
u64 uxen_shim_virt_to_phys(const void *addr);
void *uxen_shim_phys_to_virt(u64 phys);
unsigned long uxen_shim_page_offset(void);
int uxen_shim_ram_ranges(u64 *out, int max);
void *uxen_shim_kthread_run(int (*fn)(void *), void *data, const char *name);
int uxen_shim_kthread_stop(void *task);
bool uxen_shim_kthread_should_stop(void);
void uxen_shim_msleep_interruptible(unsigned int ms);
bool uxen_shim_signal_pending(void);
void uxen_shim_cond_resched(void);
void uxen_shim_schedule_timeout_interruptible(long jiffies);
unsigned long uxen_shim_usecs_to_jiffies(unsigned int us);
void *uxen_shim_waitq_new(void);
void uxen_shim_waitq_free(void *wq);
void uxen_shim_waitq_wake(void *wq);
long uxen_shim_waitq_wait(void *wq, const int *word, int old, unsigned int timeout_ms);
u64 uxen_shim_vmalloc_to_phys(const void *addr);
int uxen_shim_add_cpu(int cpu);
int uxen_shim_cpuhp_register(void);
void uxen_shim_cpuhp_unregister(void);
void *uxen_shim_alloc_split(unsigned int order);
void uxen_shim_free_page_phys(u64 phys);
void uxen_shim_fpu_begin(void);
void uxen_shim_fpu_end(void);
unsigned int uxen_shim_tsc_khz(void);

/* Implemented in Rust (hv.rs). */
void uxen_host_cpu_changed(int online);

/* Implemented in Rust (dev.rs). */
long uxen_dev_open(void **priv);
void uxen_dev_release(void *priv);
long uxen_dev_ioctl(void *priv, unsigned int cmd, unsigned long arg);
void uxen_vm_release(void *priv);
long uxen_vm_ioctl(void *priv, unsigned int cmd, unsigned long arg);

#endif
