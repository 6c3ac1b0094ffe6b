# bootblock: a 512-byte boot sector that makes a QEMU guest behave like our memtouch guest.
#
# Written for benchmarks/qemu/run.py, which migrates it with QEMU's own postcopy so that
# QEMU and postcopy (src/postcopy/vm/guests.py "memtouch") run the same workload on the
# same host in the same session.
#
# SeaBIOS loads it at 0x7c00 in real mode on the boot CPU. It opens A20 through the
# "fast A20" port 0x92 (without it every odd MiB aliases the even one below), loads a flat
# GDT and enters 32-bit protected mode. Then, by default (CPL3=1):
#   identity-maps the first 8 GiB with 2 MiB pages, U/S set at every level, enters 64-bit
#   long mode and drops to CPL3 with IOPL=3 (so OUT still exits to QEMU);
# or, built with CPL3=0: stays in 32-bit protected mode at CPL0 without paging.
# Either way it writes 'A' once to COM1, then forever increments the first byte of every
# 4 KiB page from 1 MiB up to (not including) RAM_END, then from 4 GiB up to HIGH_END
# (CPL3 only; 0 = none), in ascending order, and writes 'B' after every complete pass.
#
# Why CPL3 long mode: KVM on this machine kind is a PVM backend that runs guest code
# natively only at CPL3 and emulates CPL0 code (~2 M instructions/s, KERNEL-FACTS.md), the
# reason our micro-VM runs memtouch at CPL3. A CPL0 loop would be ~100x slower than our
# guest and would not load the migration the same way. 1 GiB pages are not supported there.
#
# RAM_END is a 32-bit little-endian word at offset 0x1f8 and HIGH_END a 64-bit one at
# 0x1f0, set by build.sh (--defsym) and patchable in the image. With 3.5 GiB of RAM or more
# the pc machine maps the first 3 GiB below 4 GiB and the rest from 4 GiB up: for -m 4G,
# RAM_END = 0xC0000000 and HIGH_END = 0x140000000.
# Only the boot CPU runs this; with -smp 2 the other vCPU stays in wait-for-SIPI.

        .set    COM1, 0x3f8
        .set    FIRST_PAGE, 0x100000    # skip low memory: BIOS data, this sector, the VGA hole
        .set    PAGE_SIZE, 4096
        .set    CODE32, 0x08
        .set    DATA32, 0x10
        .set    CODE64, 0x18
        .set    USER_CODE64, 0x20 | 3
        .set    USER_DATA, 0x28 | 3
        .set    PML4, 0x10000           # page tables in free conventional memory
        .set    PDPT, 0x11000
        .set    PAGE_DIRS, 0x12000      # 8 page directories: 8 GiB in 2 MiB pages
        .set    PAGE_TABLES_END, 0x1a000
        .set    PT_USER_RW, 0x07        # present, writable, user
        .set    PT_LARGE, 0x80
        .set    USER_RFLAGS, 0x3002     # IOPL=3, interrupts off
        .set    EFER_MSR, 0xc0000080
        .set    EFER_LME, 0x100
        .set    CR0_CACHE_OFF, 0x60000000  # CD|NW: the reset value has caching disabled
        .set    RAM_END_OFFSET, 0x1f8
        .set    HIGH_END_OFFSET, 0x1f0

        .ifndef CPL3
        .set    CPL3, 1
        .endif
        .ifndef HIGH_END
        .set    HIGH_END, 0
        .endif

        .text
        .code16
        .globl  _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %sp

        inb     $0x92, %al
        or      $0x02, %al              # A20 on
        and     $0xfe, %al              # bit 0 would reset the machine
        outb    %al, $0x92

        lgdtl   gdt_descriptor
        mov     %cr0, %eax
        and     $~CR0_CACHE_OFF, %eax
        or      $1, %eax                # PE
        mov     %eax, %cr0
        ljmpl   $CODE32, $protected

        .code32
protected:
        mov     $DATA32, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %esp

        .if     CPL3
        cld
        mov     $PML4, %edi             # zero PML4, PDPT and the directories
        mov     $(PAGE_TABLES_END - PML4) / 4, %ecx
        xor     %eax, %eax
        rep stosl
        movl    $PDPT | PT_USER_RW, PML4
        mov     $PDPT, %edi
        mov     $PAGE_DIRS | PT_USER_RW, %eax
1:      mov     %eax, (%edi)            # PDPT entry i -> directory i
        add     $PAGE_SIZE, %eax
        add     $8, %edi
        cmp     $PDPT + 8 * 8, %edi
        jb      1b
        mov     $PAGE_DIRS, %edi
        xor     %ecx, %ecx              # 2 MiB page number
2:      mov     %ecx, %eax              # entry = page << 21: low and high dwords
        shl     $21, %eax
        or      $PT_LARGE | PT_USER_RW, %eax
        mov     %eax, (%edi)
        mov     %ecx, %eax
        shr     $11, %eax
        mov     %eax, 4(%edi)
        add     $8, %edi
        inc     %ecx
        cmp     $PAGE_TABLES_END, %edi
        jb      2b

        mov     %cr4, %eax
        or      $0x20, %eax             # PAE
        mov     %eax, %cr4
        mov     $PML4, %eax
        mov     %eax, %cr3
        mov     $EFER_MSR, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000000, %eax       # PG: long mode is active from here
        mov     %eax, %cr0
        ljmp    $CODE64, $long_mode

        .code64
long_mode:
        pushq   $USER_DATA              # the iretq frame into CPL3
        pushq   $0x7c00
        pushq   $USER_RFLAGS
        pushq   $USER_CODE64
        pushq   $user
        iretq

user:
        mov     $COM1, %dx
        mov     $'A', %al
        out     %al, %dx
        mov     ram_end(%rip), %ebx
        mov     high_end(%rip), %rsi
        mov     $0x100000000, %rdi
pass:
        mov     $FIRST_PAGE, %eax
        cmp     %rbx, %rax
        jae     low_done                # RAM_END at or below 1 MiB: nothing to touch
touch_low:
        incb    (%rax)
        add     $PAGE_SIZE, %rax
        cmp     %rbx, %rax
        jb      touch_low
low_done:
        mov     %rdi, %rax
        cmp     %rsi, %rax
        jae     high_done
touch_high:
        incb    (%rax)
        add     $PAGE_SIZE, %rax
        cmp     %rsi, %rax
        jb      touch_high
high_done:
        mov     $'B', %al
        out     %al, %dx
        jmp     pass

        .else                           # CPL0, 32-bit, no paging

        mov     $COM1, %dx
        mov     $'A', %al
        out     %al, %dx                # QEMU's 16550 transmits without any set-up
        mov     ram_end, %ebx
pass:
        mov     $FIRST_PAGE, %eax
        cmp     %ebx, %eax
        jae     pass_done
touch:
        incb    (%eax)
        add     $PAGE_SIZE, %eax
        cmp     %ebx, %eax
        jb      touch
pass_done:
        mov     $'B', %al
        out     %al, %dx
        jmp     pass
        .endif

        .p2align 3
gdt:
        .quad   0                       # the null descriptor
        .quad   0x00cf9a000000ffff      # 0x08: code, 32-bit, ring 0, base 0, limit 4 GiB
        .quad   0x00cf92000000ffff      # 0x10: data, ring 0
        .quad   0x00af9a000000ffff      # 0x18: code, 64-bit, ring 0
        .quad   0x00affa000000ffff      # 0x20: code, 64-bit, ring 3
        .quad   0x00cff2000000ffff      # 0x28: data, ring 3
gdt_end:
gdt_descriptor:
        .word   gdt_end - gdt - 1
        .long   gdt

        .org    HIGH_END_OFFSET
high_end:
        .quad   HIGH_END
ram_end:
        .long   RAM_END
        .org    510
        .word   0xaa55
