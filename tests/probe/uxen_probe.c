// SPDX-License-Identifier: GPL-2.0
/*
 * uxen_probe: what ring 0 of the host sees of VMX. Each probe runs an
 * instruction under an exception-table fix-up and reports whether it
 * faulted. On a CPU without VMX (and under the hypervisor, which must look
 * like one) every VMX instruction raises #UD, CR4.VMXE cannot be set, and
 * IA32_FEATURE_CONTROL refuses writes. VMCALL is the hypervisor's interface:
 * an unknown number comes back with -ENOSYS.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <asm/asm.h>
#include <asm/msr.h>
#include <asm/special_insns.h>

static u64 page[512] __aligned(4096);

#define PROBE(name, insn, ...)                                              \
static bool probe_##name(void)                                              \
{                                                                           \
	asm goto("1: " insn "\n\t"                                          \
		 _ASM_EXTABLE(1b, %l[fault])                                \
		 : : __VA_ARGS__ : "memory", "cc" : fault);                 \
	return false;                                                       \
fault:                                                                      \
	return true;                                                        \
}

PROBE(vmxon, "vmxon %0", "m"(page))
PROBE(vmxoff, "vmxoff")
PROBE(vmclear, "vmclear %0", "m"(page))
PROBE(vmptrld, "vmptrld %0", "m"(page))
PROBE(vmread, "vmread %0, %%rax", "r"(0x681eUL))
PROBE(vmwrite, "vmwrite %%rax, %0", "r"(0x681eUL))
PROBE(vmlaunch, "vmlaunch")
PROBE(invept, "invept %0, %1", "m"(page), "r"(2UL))
PROBE(invvpid, "invvpid %0, %1", "m"(page), "r"(2UL))

static bool probe_cr4_vmxe(void)
{
	unsigned long cr4 = native_read_cr4();

	asm goto("1: mov %0, %%cr4\n\t"
		 _ASM_EXTABLE(1b, %l[fault])
		 : : "r"(cr4 | X86_CR4_VMXE) : "memory" : fault);
	/* It took: put it back. */
	asm volatile("mov %0, %%cr4" : : "r"(cr4) : "memory");
	return false;
fault:
	return true;
}

static long vmcall_unknown(void)
{
	unsigned long rax = 0xdead;

	asm volatile("1: vmcall\n\t"
		     "2:\n\t"
		     _ASM_EXTABLE(1b, 2b)
		     : "+a"(rax) : : "rdx", "memory");
	return (long)rax;
}

static int __init probe_init(void)
{
	u64 fc = 0;
	int rd, wr, cap;

	pr_info("uxen_probe: vmxon=%s vmxoff=%s vmclear=%s vmptrld=%s vmread=%s vmwrite=%s vmlaunch=%s invept=%s invvpid=%s\n",
		probe_vmxon() ? "fault" : "ok", probe_vmxoff() ? "fault" : "ok",
		probe_vmclear() ? "fault" : "ok", probe_vmptrld() ? "fault" : "ok",
		probe_vmread() ? "fault" : "ok", probe_vmwrite() ? "fault" : "ok",
		probe_vmlaunch() ? "fault" : "ok", probe_invept() ? "fault" : "ok",
		probe_invvpid() ? "fault" : "ok");
	pr_info("uxen_probe: cr4.vmxe=%s\n", probe_cr4_vmxe() ? "fault" : "ok");
	rd = rdmsrl_safe(MSR_IA32_FEAT_CTL, &fc);
	wr = wrmsrl_safe(MSR_IA32_FEAT_CTL, fc | FEAT_CTL_LOCKED | FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX);
	cap = rdmsrl_safe(MSR_IA32_VMX_BASIC, &(u64){ 0 });
	pr_info("uxen_probe: feature_control=%#llx read=%s write=%s vmx_basic_read=%s\n", fc,
		rd ? "fault" : "ok", wr ? "fault" : "ok", cap ? "fault" : "ok");
	pr_info("uxen_probe: vmcall_unknown=%ld\n", vmcall_unknown());
	return 0;
}

static void __exit probe_exit(void)
{
}

module_init(probe_init);
module_exit(probe_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("uxen-rs test probe: VMX from ring 0 of the host");
