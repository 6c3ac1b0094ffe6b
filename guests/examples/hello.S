# hello: a template for a guest of one's own (README, "Build your own guest").
#
#   make guest SRC=guests/examples/hello.S OUT=hello.bin
#   postcopy vm run --guest-image hello.bin --qmp /tmp/hello.qmp --console /tmp/hello.console
#
# Every vCPU prints "hello" once, then writes a counter into each page of its own 4 MiB
# of RAM (above 1 MiB, one share per vCPU), pass after pass, and prints '.' per pass: RAM
# that keeps changing, for a migration to move. It keeps to the guest ABI (abi.inc; the
# README's "The guest ABI"): entered at its first byte at 0x10000, at CPL3, with the RAM
# size in rdi, the vCPU index in rsi and the vCPU count in rdx; no IDT, so any exception
# triple-faults the vCPU; OUT to the console port prints a byte; no HLT (it faults at CPL3).

        .include "abi.inc"

        .set SHARE_SHIFT, 22            # 4 MiB of RAM per vCPU

        .text
        .globl _start
_start:
        mov     %rdi, %r8               # RAM size
        mov     %rsi, %r9               # vCPU index

        lea     greeting(%rip), %rsi    # print "hello\n": one OUT (one VM exit) per byte
        mov     $CONSOLE_PORT, %dx
1:
        lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:
        mov     %r9, %r14               # the share: USABLE_BASE + index * 4 MiB ...
        shl     $SHARE_SHIFT, %r14
        add     $USABLE_BASE, %r14
        lea     (1 << SHARE_SHIFT)(%r14), %r15
        cmp     %r8, %r15               # ... if it is in RAM
        ja      done

        xor     %ebx, %ebx              # the counter
pass:
        inc     %rbx
        mov     %r14, %rdi
3:
        mov     %rbx, (%rdi)            # the counter into the page's first 8 bytes
        add     $PAGE_SIZE, %rdi
        cmp     %r15, %rdi
        jb      3b
        mov     $'.', %al
        out     %al, %dx
        jmp     pass

done:                                   # no RAM of its own: say done, again if resumed
        mov     $DONE_PORT, %dx
4:
        out     %al, %dx
        jmp     4b

greeting:
        .asciz  "hello\n"
