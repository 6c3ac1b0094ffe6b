# memtouch: QEMU's classic migration test guest (tests/migration a-b-bootblock), per vCPU.
#
# RAM from 1 MiB up is split into equal page-aligned shares, one per vCPU (the last vCPU
# also takes the remainder). Each vCPU loops over its share incrementing the first byte
# of every 4 KiB page, in ascending order, and writes 'B' to the console after each
# complete pass ('A' once at start, as QEMU's guest does). So in a stopped VM each share
# holds one value, or two values differing by one with the higher before the lower: the
# edge is where the vCPU was (postcopy.vm.verify.verify_memtouch checks exactly this).
#
# params[0]: passes after which the vCPU signals done (port 0x501); 0 = run forever.

        .include "abi.inc"

        .text
        .globl _start
_start:
        mov     %rdi, %r8               # RAM size
        mov     %rsi, %r9               # vCPU index
        mov     %rdx, %r10              # vCPU count
        mov     (%rcx), %r12            # passes wanted (0 = forever)

        mov     $CONSOLE_PORT, %dx
        mov     $'A', %al
        out     %al, %dx

        test    %r10, %r10              # a zero count would #DE below: treat it as one
        jnz     1f
        mov     $1, %r10d
1:
        mov     %r8, %rax
        sub     $USABLE_BASE, %rax
        jbe     done                    # no RAM of our own
        shr     $PAGE_SHIFT, %rax
        mov     %rax, %r15              # pages above 1 MiB
        xor     %edx, %edx
        div     %r10
        mov     %rax, %r13              # pages per share

        mov     %r9, %rax
        imul    %r13, %rax              # first page of this share
        mov     %r13, %rbx              # pages in this share ...
        lea     1(%r9), %rcx
        cmp     %r10, %rcx
        jne     2f
        mov     %r15, %rbx              # ... or everything left, for the last vCPU
        sub     %rax, %rbx
2:
        shl     $PAGE_SHIFT, %rax
        add     $USABLE_BASE, %rax
        mov     %rax, %r14              # address of the share
        test    %rbx, %rbx
        jz      done                    # more vCPUs than pages: nothing to touch

        xor     %ebp, %ebp              # passes completed
pass:
        mov     %r14, %rdi
        mov     %rbx, %rcx
touch:
        incb    (%rdi)
        add     $PAGE_SIZE, %rdi
        dec     %rcx
        jnz     touch

        mov     $CONSOLE_PORT, %dx
        mov     $'B', %al
        out     %al, %dx
        inc     %rbp
        test    %r12, %r12
        jz      pass
        cmp     %r12, %rbp
        jb      pass

done:
        mov     $DONE_PORT, %dx
3:
        out     %al, %dx
        jmp     3b
