/* kvstore: a key-value service guest (GET/PUT/DELETE on a hash table spread over RAM),
 * answering requests that arrive through the micro-VM's request device.
 *
 * Built freestanding by build.sh (no libc, no writable globals: every byte of state lives
 * in guest RAM above 1 MiB, so the image is code and constants only). vCPU 0 serves; any
 * other vCPU says it is done at once.
 *
 * Memory (guest physical):
 *   0x100000  the table header (struct header)       0x100400  the receive block (1 KiB)
 *   0x100800  answers of the current batch (< 4 KiB)  0x110000  the slots, 64 bytes each
 * The table is table_ppm/1e6 of the RAM from 0x110000 up, in slots of 64 bytes:
 *   u64 key (0 = empty) | u8 vlen (1..48) | u8 pad[3] | u32 check | u8 value[48]
 * with open addressing: key k lives at home(k) = mulhi(mix64(k), slots) or after it,
 * with no empty slot in between (linear probing; deletion shifts entries back, so there
 * are no tombstones). check is a hash of key, vlen and all 48 value bytes (zero beyond
 * vlen): postcopy.vm.kvstore models all of this and verifies a stopped guest's table.
 * At start the guest inserts keys 1..P, P = slots * fill_ppm / 1e6, each with the 16-byte
 * preload value of the key, then prints "R" on the console: the service is up.
 *
 * The request device (postcopy.vm.requestdev) speaks with the guest in two exits:
 * - exchange: `rep insb` of 1024 bytes from port 0x510 into the receive block, with the
 *   answer bytes of the last batch in registers (rax = their count, at most 344; then the
 *   bytes in rbx, rbp, rsi, r8..r15, xmm0..xmm15). The device takes the answers, waits
 *   until requests are queued (or a while), and fills the block with whole request
 *   frames followed by zeros. One exit per batch, both ways.
 * - answer: `out %eax, (%dx)` to port 0x511 with the same registers, for answers beyond
 *   what the next exchange carries.
 * Answers are a byte stream of records: u16 low 16 bits of the request's tag, u8 status,
 * u8 vlen, value; the guest fills the registers with that stream, so a record may be
 * split between two exits (the device keeps the part it has).
 * Request frames: u16 length, u8 op, u8 flags (0), u32 reserved (0), u64 tag, u64 key,
 * value (PUT only, 1..48 bytes). Ops: 1 GET, 2 PUT (answers the previous value),
 * 3 DELETE (answers the deleted value), 4 INFO (answers u64 slots, preloaded keys,
 * entries, requests answered). Status: 0 OK, 1 NOT_FOUND (no such key or no previous
 * value), 2 BAD (malformed request), 3 FULL (table full).
 *
 * params[0] table_ppm (default 900000), params[1] fill_ppm (default 250000).
 * Console: "R" once the table is filled, then "." per 65536 requests answered, each on
 * a line of its own (the VMM passes console output on at a newline).
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define CONSOLE_PORT 0x3f8
#define EXCHANGE_PORT 0x510
#define ANSWER_PORT 0x511
#define USABLE_BASE 0x100000UL
#define HEADER_ADDRESS 0x100000UL
#define RX_ADDRESS 0x100400UL
#define RX_BYTES 1024
#define TX_ADDRESS 0x100800UL
#define TX_BYTES 0xF000
#define SLOTS_ADDRESS 0x110000UL
#define SLOT_BYTES 64
#define VALUE_MAX 48
#define REG_BYTES 344
#define MAGIC 0x3145524f5453564bUL /* "KVSTORE1" */

#define GOLDEN 0x9E3779B97F4A7C15UL
#define CHECK_SALT 0x6b7673746f726521UL
#define PRELOAD_SALT0 0x0123456789abcdefUL
#define PRELOAD_SALT1 0xfedcba9876543210UL

enum { OP_GET = 1, OP_PUT = 2, OP_DELETE = 3, OP_INFO = 4 };
enum { ST_OK = 0, ST_NOT_FOUND = 1, ST_BAD = 2, ST_FULL = 3 };

struct slot {
    u64 key;
    u8 vlen;
    u8 pad[3];
    u32 check;
    u64 value[VALUE_MAX / 8];
};

struct header {
    u64 magic;
    u64 slots;
    u64 preloaded;
    u64 entries;
    u64 busy;      /* 1 while the table is being changed: a stop there is mid-update */
    u64 requests;  /* requests answered */
    u64 gets, puts, deletes, infos, bad, full;
    u64 ready;     /* 1 once the preload is done */
};

/* The entry (first byte of the image), the two device exits. */
__asm__(
    ".section .text.entry, \"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "    call kvstore_main\n"
    "1:  mov $0x501, %dx\n"
    "    out %al, %dx\n"
    "    jmp 1b\n"
    ".text\n"
    /* void load_answer_registers(const u8 *bytes) is not a function: the macro below is
     * the common body of both exits. rdi = the answer bytes (344 readable), rsi = count. */
    ".macro LOAD_ANSWERS\n"
    "    push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n"
    "    movdqu 88(%rdi), %xmm0\n  movdqu 104(%rdi), %xmm1\n"
    "    movdqu 120(%rdi), %xmm2\n movdqu 136(%rdi), %xmm3\n"
    "    movdqu 152(%rdi), %xmm4\n movdqu 168(%rdi), %xmm5\n"
    "    movdqu 184(%rdi), %xmm6\n movdqu 200(%rdi), %xmm7\n"
    "    movdqu 216(%rdi), %xmm8\n movdqu 232(%rdi), %xmm9\n"
    "    movdqu 248(%rdi), %xmm10\n movdqu 264(%rdi), %xmm11\n"
    "    movdqu 280(%rdi), %xmm12\n movdqu 296(%rdi), %xmm13\n"
    "    movdqu 312(%rdi), %xmm14\n movdqu 328(%rdi), %xmm15\n"
    "    mov %rsi, %rax\n"
    "    mov 0(%rdi), %rbx\n  mov 8(%rdi), %rbp\n  mov 16(%rdi), %rsi\n"
    "    mov 24(%rdi), %r8\n  mov 32(%rdi), %r9\n  mov 40(%rdi), %r10\n"
    "    mov 48(%rdi), %r11\n mov 56(%rdi), %r12\n mov 64(%rdi), %r13\n"
    "    mov 72(%rdi), %r14\n mov 80(%rdi), %r15\n"
    ".endm\n"
    ".macro RESTORE\n"
    "    pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n"
    ".endm\n"
    /* void kv_exchange(const u8 *answers, u64 count, u8 *block) */
    ".globl kv_exchange\n"
    "kv_exchange:\n"
    "    push %rdx\n"
    "    LOAD_ANSWERS\n"
    "    mov 48(%rsp), %rdi\n"   /* the block pointer pushed first, under six registers */
    "    mov $1024, %ecx\n"
    "    mov $0x510, %edx\n"
    "    rep insb\n"
    "    RESTORE\n"
    "    add $8, %rsp\n"
    "    ret\n"
    /* void kv_answer(const u8 *answers, u64 count) */
    ".globl kv_answer\n"
    "kv_answer:\n"
    "    LOAD_ANSWERS\n"
    "    mov $0x511, %edx\n"
    "    out %eax, (%dx)\n"
    "    RESTORE\n"
    "    ret\n");

void kv_exchange(const u8 *answers, u64 count, u8 *block);
void kv_answer(const u8 *answers, u64 count);

/* What a freestanding compiler may still call (struct copies). */
void *memcpy(void *to, const void *from, u64 n) {
    u8 *t = to;
    const u8 *f = from;
    while (n--)
        *t++ = *f++;
    return to;
}

void *memset(void *to, int value, u64 n) {
    u8 *t = to;
    while (n--)
        *t++ = (u8)value;
    return to;
}

static inline void outb(u16 port, u8 value) {
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

/* The compiler must not move table writes across the busy flag's. */
#define barrier() __asm__ volatile("" ::: "memory")

static u64 mix64(u64 x) {
    u64 z = x + GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
    return z ^ (z >> 31);
}

static u64 home(u64 key, u64 slots) {
    return (u64)(((unsigned __int128)mix64(key) * slots) >> 64);
}

static u32 slot_check(const struct slot *s) {
    u64 h = mix64(s->key ^ ((u64)s->vlen << 56) ^ CHECK_SALT);
    for (int i = 0; i < VALUE_MAX / 8; i++)
        h = mix64(h ^ s->value[i]);
    return (u32)(h ^ (h >> 32));
}

static void copy(u8 *to, const u8 *from, u64 n) {
    for (u64 i = 0; i < n; i++)
        to[i] = from[i];
}

static void set_value(struct slot *s, const u8 *value, u64 vlen) {
    u8 *bytes = (u8 *)s->value;
    for (u64 i = 0; i < VALUE_MAX; i++)
        bytes[i] = i < vlen ? value[i] : 0;
    s->vlen = (u8)vlen;
    s->check = slot_check(s);
}

/* The slot holding key, or the empty slot where it would go. */
static u64 find(struct slot *table, u64 slots, u64 key) {
    u64 i = home(key, slots);
    while (table[i].key != 0 && table[i].key != key)
        i = i + 1 == slots ? 0 : i + 1;
    return i;
}

/* Backward-shift deletion: move later entries of the run back so that no empty slot
 * lies between any key and its home. */
static void remove_at(struct slot *table, u64 slots, u64 i) {
    u64 j = i;
    for (;;) {
        j = j + 1 == slots ? 0 : j + 1;
        if (table[j].key == 0)
            break;
        u64 k = home(table[j].key, slots);
        int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        table[i] = table[j];
        i = j;
    }
    table[i].key = 0;
    table[i].vlen = 0;
    table[i].check = 0;
    for (int w = 0; w < VALUE_MAX / 8; w++)
        table[i].value[w] = 0;
}

static u64 put_u64(u8 *to, u64 value) {
    for (int i = 0; i < 8; i++)
        to[i] = (u8)(value >> (8 * i));
    return 8;
}

/* Serve one request frame; write its answer record at out; return the record's size. */
static u64 serve(struct header *h, struct slot *table, const u8 *frame, u64 length, u8 *out) {
    u64 tag = *(const u64 *)(frame + 8);
    u8 op = frame[2];
    u8 *value = out + 4;
    u64 vlen = 0;
    u8 status = ST_OK;
    out[0] = (u8)tag;
    out[1] = (u8)(tag >> 8);
    if (length < 24 || frame[3] != 0 || *(const u32 *)(frame + 4) != 0) {
        status = ST_BAD;
        h->bad++;
        goto done;
    }
    u64 key = *(const u64 *)(frame + 16);
    u64 given = length - 24;
    const u8 *data = frame + 24;
    if (op == OP_INFO && given == 0) {
        h->infos++;
        vlen = put_u64(value, h->slots);
        vlen += put_u64(value + vlen, h->preloaded);
        vlen += put_u64(value + vlen, h->entries);
        vlen += put_u64(value + vlen, h->requests);
        goto done;
    }
    if (key == 0 || (op == OP_PUT ? given == 0 || given > VALUE_MAX : given != 0)) {
        status = ST_BAD;
        h->bad++;
        goto done;
    }
    u64 i = find(table, h->slots, key);
    struct slot *s = &table[i];
    int found = s->key == key;
    if (found) {
        vlen = s->vlen;
        copy(value, (const u8 *)s->value, vlen);
    } else {
        status = ST_NOT_FOUND;
    }
    switch (op) {
    case OP_GET:
        h->gets++;
        break;
    case OP_PUT:
        h->puts++;
        if (!found && h->entries + 1 >= h->slots) {
            status = ST_FULL;
            h->full++;
            break;
        }
        h->busy = 1;
        barrier();
        if (!found) {
            s->key = key;
            h->entries++;
        }
        set_value(s, data, given);
        barrier();
        h->busy = 0;
        break;
    case OP_DELETE:
        h->deletes++;
        if (found) {
            h->busy = 1;
            barrier();
            remove_at(table, h->slots, i);
            h->entries--;
            barrier();
            h->busy = 0;
        }
        break;
    default:
        status = ST_BAD;
        vlen = 0;
        h->bad++;
    }
done:
    out[2] = status;
    out[3] = (u8)vlen;
    return 4 + vlen;
}

static void preload(struct header *h, struct slot *table) {
    u64 value[2];
    h->busy = 1;
    barrier();
    /* First touch of guest RAM is slow here (the host backs it lazily) and slower still
     * in random order: touch the table's pages in order first (measured on 1 GiB). */
    volatile u64 *word = (volatile u64 *)table;
    for (u64 at = 0; at < h->slots * SLOT_BYTES / 8; at += 4096 / 8)
        word[at] = 0;
    for (u64 key = 1; key <= h->preloaded; key++) {
        struct slot *s = &table[find(table, h->slots, key)];
        value[0] = mix64(key ^ PRELOAD_SALT0);
        value[1] = mix64(key ^ PRELOAD_SALT1);
        s->key = key;
        set_value(s, (const u8 *)value, sizeof value);
        h->entries++;
    }
    barrier();
    h->busy = 0;
}

void kvstore_main(u64 ram_size, u64 index, u64 count, const u64 *params) {
    (void)count;
    if (index != 0 || ram_size <= SLOTS_ADDRESS + 2 * SLOT_BYTES)
        return;
    struct header *h = (struct header *)HEADER_ADDRESS;
    struct slot *table = (struct slot *)SLOTS_ADDRESS;
    u8 *rx = (u8 *)RX_ADDRESS;
    u8 *tx = (u8 *)TX_ADDRESS;
    u64 table_ppm = params[0] ? params[0] : 900000;
    u64 fill_ppm = params[1] ? params[1] : 250000;
    if (table_ppm > 1000000)
        table_ppm = 1000000;
    if (fill_ppm > 900000)
        fill_ppm = 900000;
    /* no overflow: RAM < 2**34 and ppm < 2**20 */
    u64 slots = (ram_size - SLOTS_ADDRESS) * table_ppm / 1000000 / SLOT_BYTES;
    if (slots < 2)
        slots = 2;
    h->magic = MAGIC;
    h->slots = slots;
    h->preloaded = slots * fill_ppm / 1000000;
    preload(h, table);
    h->ready = 1;
    outb(CONSOLE_PORT, 'R');
    outb(CONSOLE_PORT, '\n'); /* the VMM passes console output on at a newline */

    u64 pending = 0; /* answer bytes at tx not yet handed to the device */
    for (;;) {
        u64 sent = 0;
        while (pending - sent > REG_BYTES) {
            kv_answer(tx + sent, REG_BYTES);
            sent += REG_BYTES;
        }
        kv_exchange(tx + sent, pending - sent, rx);
        pending = 0;
        u64 at = 0;
        while (at + 16 <= RX_BYTES) {
            u64 length = *(const u16 *)(rx + at);
            if (length == 0)
                break;
            if (length < 16 || at + length > RX_BYTES || pending + 4 + VALUE_MAX > TX_BYTES) {
                h->bad++; /* the device sends whole frames: the rest of the block is lost */
                break;
            }
            pending += serve(h, table, rx + at, length, tx + pending);
            at += length;
            if ((++h->requests & 0xffff) == 0) {
                outb(CONSOLE_PORT, '.');
                outb(CONSOLE_PORT, '\n');
            }
        }
    }
}
