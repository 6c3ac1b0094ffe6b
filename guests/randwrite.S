# randwrite: random 64-bit writes at full speed over a working set (a write-heavy guest).
#
# The working set is the first params[0] parts per million of the pages above 1 MiB
# (0 means 100000, i.e. 10%; at least one page). Each vCPU runs xorshift64
# (x ^= x << 13; x ^= x >> 7; x ^= x << 17) from the seed
#   x0 = params[1] XOR ((vCPU index + 1) * 0x9E3779B97F4A7C15)   (if 0: 0x9E3779B97F4A7C15)
# and, for every value x of the sequence, stores x itself at
#   USABLE_BASE + page * 4096 + (x & 0xFF8),   page = (x * working_set_pages) >> 64
# so every word it ever wrote tells where it belongs (verify_randwrite checks this).
# It writes 'W' to the console after every 2**20 writes of its own.
#
# params[0]: working set in parts per million (0 = 100000)
# params[1]: seed (mixed with the vCPU index)
# params[2]: writes after which the vCPU signals done (port 0x501); 0 = run forever.

        .include "abi.inc"

        .set GOLDEN, 0x9E3779B97F4A7C15
        .set PPM, 1000000
        .set DEFAULT_PPM, 100000
        .set MARKER_MASK, (1 << 20) - 1

        .text
        .globl _start
_start:
        mov     %rsi, %r9               # vCPU index
        mov     %rcx, %r11              # parameter block

        mov     %rdi, %rax
        sub     $USABLE_BASE, %rax
        jbe     done                    # no RAM of our own
        shr     $PAGE_SHIFT, %rax       # pages above 1 MiB
        mov     (%r11), %rcx            # working set, ppm
        test    %rcx, %rcx
        jnz     1f
        mov     $DEFAULT_PPM, %ecx
1:
        cmp     $PPM, %rcx
        jbe     2f
        mov     $PPM, %ecx
2:
        mul     %rcx
        mov     $PPM, %ecx
        div     %rcx                    # rax = pages * ppm / 1e6 (quotient fits: ppm <= 1e6)
        test    %rax, %rax
        jnz     3f
        mov     $1, %eax
3:
        mov     %rax, %r13              # working-set pages

        lea     1(%r9), %rax
        movabs  $GOLDEN, %rcx
        imul    %rcx, %rax
        xor     8(%r11), %rax
        jnz     4f
        mov     %rcx, %rax              # xorshift must never start from zero
4:
        mov     %rax, %r14              # x
        mov     16(%r11), %r12          # write limit (0 = forever)
        xor     %ebp, %ebp              # writes done
        mov     $USABLE_BASE, %r15

write:
        mov     %r14, %rax
        shl     $13, %rax
        xor     %rax, %r14
        mov     %r14, %rax
        shr     $7, %rax
        xor     %rax, %r14
        mov     %r14, %rax
        shl     $17, %rax
        xor     %rax, %r14

        mov     %r14, %rax
        mul     %r13                    # rdx = (x * pages) >> 64: the page, unbiased enough
        shl     $PAGE_SHIFT, %rdx
        mov     %r14, %rax
        and     $0xFF8, %eax
        add     %rax, %rdx
        mov     %r14, (%r15,%rdx)

        inc     %rbp
        test    $MARKER_MASK, %ebp
        jnz     5f
        mov     $CONSOLE_PORT, %dx
        mov     $'W', %al
        out     %al, %dx
5:
        test    %r12, %r12
        jz      write
        cmp     %r12, %rbp
        jb      write

done:
        mov     $DONE_PORT, %dx
6:
        out     %al, %dx
        jmp     6b
