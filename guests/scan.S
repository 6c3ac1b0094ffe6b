# scan: reads all RAM from 1 MiB up, pass after pass, and checksums it (a read-only guest).
#
# Every vCPU reads the whole range in ascending order, as u64 words w[0..n), computing
# the Fletcher-like sums a += w[i]; b += a (mod 2**64), i.e.
#   checksum = sum((n - i) * w[i]) mod 2**64
# which changes when a page moves, not only when a word changes. vCPU 0 alone reports,
# so lines never interleave: after each pass it writes the checksum as 16 lowercase hex
# digits and '\n' (17 console bytes). It writes nothing to RAM.
#
# params[0]: passes after which the vCPU signals done (port 0x501); 0 = run forever.

        .include "abi.inc"

        .text
        .globl _start
_start:
        mov     %rsi, %r9               # vCPU index
        mov     (%rcx), %r12            # passes wanted (0 = forever)

        mov     %rdi, %r13
        sub     $USABLE_BASE, %r13
        jbe     done                    # no RAM of our own
        shr     $5, %r13                # 32-byte blocks (RAM is whole pages)
        jz      done

        xor     %ebp, %ebp              # passes completed
pass:
        xor     %eax, %eax              # a
        xor     %ebx, %ebx              # b
        mov     $USABLE_BASE, %rsi
        mov     %r13, %rcx
sum:
        add     (%rsi), %rax
        add     %rax, %rbx
        add     8(%rsi), %rax
        add     %rax, %rbx
        add     16(%rsi), %rax
        add     %rax, %rbx
        add     24(%rsi), %rax
        add     %rax, %rbx
        add     $32, %rsi
        dec     %rcx
        jnz     sum

        inc     %rbp
        test    %r9, %r9
        jnz     reported

        mov     $CONSOLE_PORT, %dx
        mov     $16, %ecx
hex:
        rol     $4, %rbx                # most significant digit first; 16 turns restore rbx
        mov     %ebx, %eax
        and     $0xF, %eax
        cmp     $10, %al
        jb      1f
        add     $('a' - '0' - 10), %al
1:
        add     $'0', %al
        out     %al, %dx
        dec     %ecx
        jnz     hex
        mov     $'\n', %al
        out     %al, %dx

reported:
        test    %r12, %r12
        jz      pass
        cmp     %r12, %rbp
        jb      pass

done:
        mov     $DONE_PORT, %dx
2:
        out     %al, %dx
        jmp     2b
