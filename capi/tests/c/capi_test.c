/* End-to-end test of the onestep C ABI (linked against the static and the shared library by
 * scripts/test-bindings, run natively and under valgrind).
 *
 *   capi_test MODEL.onnx WORKDIR [MAX_NEW_TOKENS]
 *
 * MODEL is an exported step graph with a tokenizer (SmolLM2 natively, a tiny export under valgrind).
 * WORKDIR is a scratch directory for the corrupt/empty/truncated files written at test time.
 * Env ONESTEP_HOSTILE_DIR (default tests/fixtures/hostile): every *.onnx in it must fail to load with
 * a typed error, from a path and from memory.
 * Env WHISPER (optional): a Whisper export (onestep-export of Whisper tiny.en); when set, the
 * transcription API is tested on the WAV clips in ONESTEP_WHISPER_FIXTURES (default
 * tests/fixtures/whisper). WHISPER_MODE: full (default: speech_01.wav and speech_long.wav), short
 * (speech_01.wav only) or quick (no call that encodes audio: the error paths, for valgrind).
 * Exit status 0 when every check passed. */
#include "onestep.h"

#include <dirent.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        checks++;                                                          \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

/* Checks that `call` returned `want` and left a non-empty per-thread message. */
#define EXPECT_STATUS(call, want)                                                             \
    do {                                                                                      \
        OnestepStatus got_ = (call);                                                          \
        CHECK(got_ == (want), "%s returned %s (%d), want %s: %s", #call,                      \
              onestep_status_name(got_), got_, onestep_status_name(want), onestep_last_error()); \
        if ((want) != ONESTEP_STATUS_OK)                                                      \
            CHECK(onestep_last_error()[0] != '\0', "%s: empty error message", #call);         \
    } while (0)

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static int write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = len ? fwrite(data, 1, len, f) : 0;
    fclose(f);
    return w == len ? 0 : -1;
}

/* ---- streaming ------------------------------------------------------------------------------ */

typedef struct {
    char text[65536];
    size_t len;
    int pieces;
    uint32_t last_token;
} Collected;

static bool collect(const char *text, size_t text_len, uint32_t token_id, void *user_data) {
    Collected *c = user_data;
    CHECK(text != NULL, "piece text is NULL");
    CHECK(strlen(text) == text_len, "text_len %zu != strlen %zu", text_len, strlen(text));
    if (c->len + text_len < sizeof c->text) {
        memcpy(c->text + c->len, text, text_len);
        c->len += text_len;
        c->text[c->len] = '\0';
    }
    c->pieces++;
    c->last_token = token_id;
    printf("%s", text);
    fflush(stdout);
    return true;
}

static OnestepOptions greedy(const OnestepModel *model, uint32_t max_new) {
    OnestepOptions o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    OnestepStatus st = onestep_options_default(model, &o);
    CHECK(st == ONESTEP_STATUS_OK, "options_default: %s", onestep_last_error());
    o.max_new_tokens = max_new;
    o.temperature = 0.0f;
    return o;
}

static void test_stream(OnestepModel *model, uint32_t max_new) {
    OnestepSession *s = NULL;
    EXPECT_STATUS(onestep_session_new(model, &s), ONESTEP_STATUS_OK);
    if (!s) return;
    OnestepOptions o = greedy(model, max_new);

    /* Callback streaming: pieces concatenate to the returned text. */
    Collected *c = calloc(1, sizeof *c);
    char *text = NULL;
    printf("prompt: The capital of France is\nreply: ");
    EXPECT_STATUS(onestep_session_generate(s, "The capital of France is", &o, collect, c, &text),
                  ONESTEP_STATUS_OK);
    printf("\n");
    CHECK(text != NULL, "no text_out");
    CHECK(c->pieces >= 1, "no pieces streamed");
    if (text) CHECK(strcmp(text, c->text) == 0, "text_out '%s' != pieces '%s'", text, c->text);
    OnestepStats stats;
    memset(&stats, 0, sizeof stats);
    stats.struct_size = sizeof stats;
    EXPECT_STATUS(onestep_session_last_stats(s, &stats), ONESTEP_STATUS_OK);
    CHECK(stats.stop_reason == ONESTEP_STOP_REASON_MAX_TOKENS ||
              stats.stop_reason == ONESTEP_STOP_REASON_STOP_TOKEN,
          "stop reason %d", stats.stop_reason);
    CHECK(stats.generated_tokens >= 1 && stats.generated_tokens <= max_new, "generated %u",
          stats.generated_tokens);
    CHECK(stats.prompt_tokens >= 5 && stats.prefill_tokens == stats.prompt_tokens,
          "prompt %u prefill %u", stats.prompt_tokens, stats.prefill_tokens);
    printf("stats: %u prompt tokens, %u generated, prefill %.1f ms, decode %.2f tok/s, stop %d\n",
           stats.prompt_tokens, stats.generated_tokens, stats.prefill_ms, stats.decode_tokens_per_s,
           stats.stop_reason);

    /* Pull streaming gives the same greedy text. */
    EXPECT_STATUS(onestep_session_start(s, "The capital of France is", &o), ONESTEP_STATUS_OK);
    char pulled[65536] = {0};
    size_t plen = 0;
    int npieces = 0;
    for (;;) {
        OnestepPiece p;
        bool done = false;
        OnestepStatus st = onestep_session_next_piece(s, &p, &done);
        CHECK(st == ONESTEP_STATUS_OK, "next_piece: %s", onestep_last_error());
        if (st != ONESTEP_STATUS_OK || done) {
            CHECK(p.text == NULL, "text set at the end");
            break;
        }
        CHECK(p.text != NULL && strlen(p.text) == p.text_len, "piece text");
        if (plen + p.text_len < sizeof pulled) {
            memcpy(pulled + plen, p.text, p.text_len);
            plen += p.text_len;
        }
        npieces++;
        onestep_string_free(p.text);
    }
    CHECK(npieces == c->pieces, "pull gave %d pieces, callback %d", npieces, c->pieces);
    if (text) CHECK(strcmp(pulled, text) == 0, "pull '%s' != callback '%s'", pulled, text);
    /* After the end the pull API reports a bad state, not a crash. */
    {
        OnestepPiece p;
        bool done;
        EXPECT_STATUS(onestep_session_next_piece(s, &p, &done), ONESTEP_STATUS_BAD_STATE);
    }
    /* A pull generation abandoned half-way is ended by the next call. */
    EXPECT_STATUS(onestep_session_start(s, "Once upon a time", &o), ONESTEP_STATUS_OK);
    {
        OnestepPiece p;
        bool done;
        EXPECT_STATUS(onestep_session_next_piece(s, &p, &done), ONESTEP_STATUS_OK);
        onestep_string_free(p.text);
    }
    EXPECT_STATUS(onestep_session_reset(s), ONESTEP_STATUS_OK);

    /* Chat (when the model has a template): one turn, then a second that reuses the cache. */
    OnestepModelInfo info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT_STATUS(onestep_model_info(model, &info), ONESTEP_STATUS_OK);
    if (info.has_chat_template) {
        /* Short turns: the tiny test models hold only 64 tokens. */
        OnestepChatMessage m[3] = {{"user", "Hi"}, {"assistant", NULL}, {"user", "Go"}};
        o.max_new_tokens = 3;
        char *reply = NULL;
        EXPECT_STATUS(onestep_session_chat(s, m, 1, &o, NULL, NULL, &reply), ONESTEP_STATUS_OK);
        CHECK(reply != NULL, "no chat reply");
        m[1].content = reply ? reply : "";
        char *reply2 = NULL;
        EXPECT_STATUS(onestep_session_chat(s, m, 3, &o, NULL, NULL, &reply2), ONESTEP_STATUS_OK);
        EXPECT_STATUS(onestep_session_last_stats(s, &stats), ONESTEP_STATUS_OK);
        CHECK(stats.reused_tokens > 0, "second chat turn reused no tokens");
        printf("chat: reply 1 '%s', reply 2 '%s' (%u tokens reused)\n", reply ? reply : "",
               reply2 ? reply2 : "", stats.reused_tokens);
        onestep_string_free(reply);
        onestep_string_free(reply2);
        /* A message with a NULL content is refused. */
        OnestepChatMessage bad[1] = {{"user", NULL}};
        EXPECT_STATUS(onestep_session_chat(s, bad, 1, &o, NULL, NULL, NULL), ONESTEP_STATUS_NULL_POINTER);
    } else {
        OnestepChatMessage m[1] = {{"user", "hi"}};
        EXPECT_STATUS(onestep_session_chat(s, m, 1, &o, NULL, NULL, NULL), ONESTEP_STATUS_TEMPLATE);
    }
    onestep_string_free(text);
    free(c);
    onestep_session_free(s);
}

/* ---- cancel from another thread ------------------------------------------------------------- */

typedef struct {
    OnestepSession *session;
    sem_t go;
    sem_t cancelled;
    int pieces;
} CancelCtx;

static void *canceller(void *arg) {
    CancelCtx *ctx = arg;
    sem_wait(&ctx->go);
    onestep_session_cancel(ctx->session);
    sem_post(&ctx->cancelled);
    return NULL;
}

/* On the second piece, let the other thread cancel and wait until it has. */
static bool cancel_on_second(const char *text, size_t len, uint32_t tok, void *user_data) {
    (void)text;
    (void)len;
    (void)tok;
    CancelCtx *ctx = user_data;
    if (++ctx->pieces == 2) {
        sem_post(&ctx->go);
        sem_wait(&ctx->cancelled);
    }
    return true;
}

static void test_cancel(OnestepModel *model) {
    CancelCtx ctx;
    memset(&ctx, 0, sizeof ctx);
    EXPECT_STATUS(onestep_session_new(model, &ctx.session), ONESTEP_STATUS_OK);
    if (!ctx.session) return;
    sem_init(&ctx.go, 0, 0);
    sem_init(&ctx.cancelled, 0, 0);
    pthread_t t;
    pthread_create(&t, NULL, canceller, &ctx);
    OnestepOptions o = greedy(model, 50);
    o.ignore_stop_tokens = true;
    EXPECT_STATUS(onestep_session_generate(ctx.session, "Count: one, two, three,", &o, cancel_on_second,
                                           &ctx, NULL),
                  ONESTEP_STATUS_OK);
    pthread_join(t, NULL);
    OnestepStats stats;
    memset(&stats, 0, sizeof stats);
    stats.struct_size = sizeof stats;
    EXPECT_STATUS(onestep_session_last_stats(ctx.session, &stats), ONESTEP_STATUS_OK);
    CHECK(stats.stop_reason == ONESTEP_STOP_REASON_CANCELLED, "stop reason %d", stats.stop_reason);
    CHECK(stats.generated_tokens == 2, "generated %u after a cancel at piece 2", stats.generated_tokens);
    printf("cancel: stopped after %u tokens (of 50) from another thread\n", stats.generated_tokens);
    /* The flag was consumed: the next generation runs normally. */
    OnestepOptions o2 = greedy(model, 2);
    EXPECT_STATUS(onestep_session_generate(ctx.session, "Hello", &o2, NULL, NULL, NULL), ONESTEP_STATUS_OK);
    EXPECT_STATUS(onestep_session_last_stats(ctx.session, &stats), ONESTEP_STATUS_OK);
    CHECK(stats.stop_reason != ONESTEP_STOP_REASON_CANCELLED, "still cancelled");
    sem_destroy(&ctx.go);
    sem_destroy(&ctx.cancelled);
    onestep_session_free(ctx.session);
}

/* ---- error paths ---------------------------------------------------------------------------- */

static bool stop_at_once(const char *t, size_t l, uint32_t id, void *u) {
    (void)t;
    (void)l;
    (void)id;
    (void)u;
    return false;
}

static void test_errors(OnestepModel *model, const char *model_path, const char *workdir) {
    OnestepModel *m = (OnestepModel *)0x1; /* must be reset to NULL on failure */
    OnestepSession *s = NULL;
    OnestepOptions o = greedy(model, 2);
    char path[4096];

    /* NULL pointers, everywhere. */
    EXPECT_STATUS(onestep_model_load(NULL, &m), ONESTEP_STATUS_NULL_POINTER);
    CHECK(m == NULL, "model_out not reset");
    EXPECT_STATUS(onestep_model_load(model_path, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_model_load_from_memory(NULL, 10, NULL, &m), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_model_load_from_memory((const uint8_t *)"x", 1, NULL, NULL),
                  ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_model_info(NULL, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_model_info(model, NULL), ONESTEP_STATUS_NULL_POINTER);
    CHECK(onestep_model_architecture(NULL) == NULL, "architecture of NULL");
    EXPECT_STATUS(onestep_options_default(model, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_new(NULL, &s), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_new(model, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_generate(NULL, "hi", &o, NULL, NULL, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_chat(NULL, NULL, 0, NULL, NULL, NULL, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_start(NULL, "hi", NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_start_chat(NULL, NULL, 0, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_next_piece(NULL, NULL, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_last_stats(NULL, NULL), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_session_reset(NULL), ONESTEP_STATUS_NULL_POINTER);
    onestep_session_cancel(NULL);
    onestep_session_free(NULL);
    onestep_model_free(NULL);
    onestep_string_free(NULL);
    CHECK(strcmp(onestep_status_name(999), "unknown") == 0, "status name of 999");

    EXPECT_STATUS(onestep_session_new(model, &s), ONESTEP_STATUS_OK);
    if (!s) return;
    char *text = (char *)0x1;
    EXPECT_STATUS(onestep_session_generate(s, NULL, &o, NULL, NULL, &text), ONESTEP_STATUS_NULL_POINTER);
    CHECK(text == NULL, "text_out not reset on failure");
    EXPECT_STATUS(onestep_session_chat(s, NULL, 1, &o, NULL, NULL, NULL), ONESTEP_STATUS_NULL_POINTER);
    {
        OnestepPiece p;
        bool done;
        EXPECT_STATUS(onestep_session_next_piece(s, NULL, &done), ONESTEP_STATUS_NULL_POINTER);
        EXPECT_STATUS(onestep_session_next_piece(s, &p, NULL), ONESTEP_STATUS_NULL_POINTER);
        EXPECT_STATUS(onestep_session_next_piece(s, &p, &done), ONESTEP_STATUS_BAD_STATE);
    }

    /* Bad path, corrupt file, empty file, truncated buffer. */
    snprintf(path, sizeof path, "%s/does-not-exist.onnx", workdir);
    EXPECT_STATUS(onestep_model_load(path, &m), ONESTEP_STATUS_IO);
    CHECK(strstr(onestep_last_error(), "does-not-exist.onnx") != NULL, "error names the file: %s",
          onestep_last_error());
    unsigned char noise[4096];
    unsigned x = 12345;
    for (size_t i = 0; i < sizeof noise; i++) {
        x = x * 1103515245u + 12345u;
        noise[i] = (unsigned char)(x >> 16);
    }
    snprintf(path, sizeof path, "%s/corrupt.onnx", workdir);
    CHECK(write_file(path, noise, sizeof noise) == 0, "write %s", path);
    EXPECT_STATUS(onestep_model_load(path, &m), ONESTEP_STATUS_INVALID_MODEL);
    CHECK(m == NULL, "model_out set on failure");
    snprintf(path, sizeof path, "%s/empty.onnx", workdir);
    CHECK(write_file(path, "", 0) == 0, "write %s", path);
    EXPECT_STATUS(onestep_model_load(path, &m), ONESTEP_STATUS_INVALID_MODEL);
    EXPECT_STATUS(onestep_model_load_from_memory(noise, 0, "empty", &m), ONESTEP_STATUS_INVALID_MODEL);
    size_t len = 0;
    char *whole = read_file(model_path, &len);
    CHECK(whole != NULL && len > 100, "read %s", model_path);
    if (whole) {
        EXPECT_STATUS(onestep_model_load_from_memory((const uint8_t *)whole, len / 2, "half", &m),
                      ONESTEP_STATUS_INVALID_MODEL);
        CHECK(strstr(onestep_last_error(), "half") != NULL, "error names the buffer: %s",
              onestep_last_error());
        EXPECT_STATUS(onestep_model_load_from_memory((const uint8_t *)whole, len - 1, "minus-one", &m),
                      ONESTEP_STATUS_INVALID_MODEL);
        /* The whole buffer loads, and the model outlives the caller's buffer. */
        EXPECT_STATUS(onestep_model_load_from_memory((const uint8_t *)whole, len, "whole", &m),
                      ONESTEP_STATUS_OK);
        free(whole);
        if (m) {
            OnestepSession *s2 = NULL;
            EXPECT_STATUS(onestep_session_new(m, &s2), ONESTEP_STATUS_OK);
            onestep_model_free(m); /* the session keeps the model alive */
            m = NULL;
            char *t2 = NULL;
            EXPECT_STATUS(onestep_session_generate(s2, "Hello", &o, NULL, NULL, &t2), ONESTEP_STATUS_OK);
            onestep_string_free(t2);
            onestep_session_free(s2);
        }
    }

    /* Prompt longer than the cache; invalid UTF-8; empty prompt; bad options. */
    OnestepModelInfo info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT_STATUS(onestep_model_info(model, &info), ONESTEP_STATUS_OK);
    size_t words = (size_t)info.max_cache + 8;
    char *longp = malloc(words * 6 + 1);
    for (size_t i = 0; i < words; i++) memcpy(longp + i * 6, "hello ", 6);
    longp[words * 6] = '\0';
    EXPECT_STATUS(onestep_session_generate(s, longp, &o, NULL, NULL, NULL), ONESTEP_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(onestep_last_error(), "cache") != NULL, "message: %s", onestep_last_error());
    EXPECT_STATUS(onestep_session_start(s, longp, &o), ONESTEP_STATUS_INVALID_ARGUMENT);
    free(longp);
    EXPECT_STATUS(onestep_session_generate(s, "bad \xff\xfe utf8", &o, NULL, NULL, NULL),
                  ONESTEP_STATUS_INVALID_UTF8);
    EXPECT_STATUS(onestep_session_generate(s, "half \xe2\x82", &o, NULL, NULL, NULL), ONESTEP_STATUS_INVALID_UTF8);
    {
        OnestepChatMessage bad[1] = {{"user", "\xc3\x28"}};
        EXPECT_STATUS(onestep_session_chat(s, bad, 1, &o, NULL, NULL, NULL), ONESTEP_STATUS_INVALID_UTF8);
    }
    OnestepOptions bad = o;
    bad.top_p = 1.5f;
    EXPECT_STATUS(onestep_session_generate(s, "hi", &bad, NULL, NULL, NULL), ONESTEP_STATUS_INVALID_ARGUMENT);
    bad = o;
    bad.max_new_tokens = 0;
    EXPECT_STATUS(onestep_session_generate(s, "hi", &bad, NULL, NULL, NULL), ONESTEP_STATUS_INVALID_ARGUMENT);
    bad = o;
    bad.struct_size = 8;
    EXPECT_STATUS(onestep_session_generate(s, "hi", &bad, NULL, NULL, NULL), ONESTEP_STATUS_INVALID_ARGUMENT);
    bad = o;
    bad.stop_strings_len = 1;
    EXPECT_STATUS(onestep_session_generate(s, "hi", &bad, NULL, NULL, NULL), ONESTEP_STATUS_NULL_POINTER);
    const char *stops[2] = {"ok", "\xff"};
    bad.stop_strings = stops;
    bad.stop_strings_len = 2;
    EXPECT_STATUS(onestep_session_generate(s, "hi", &bad, NULL, NULL, NULL), ONESTEP_STATUS_INVALID_ARGUMENT);
    OnestepStats st;
    st.struct_size = 4;
    EXPECT_STATUS(onestep_session_last_stats(s, &st), ONESTEP_STATUS_INVALID_ARGUMENT);

    /* After all that the session works; a callback returning false stops as cancelled. */
    EXPECT_STATUS(onestep_session_generate(s, "Hello", &o, stop_at_once, NULL, NULL), ONESTEP_STATUS_OK);
    st.struct_size = sizeof st;
    EXPECT_STATUS(onestep_session_last_stats(s, &st), ONESTEP_STATUS_OK);
    CHECK(st.stop_reason == ONESTEP_STOP_REASON_CANCELLED && st.generated_tokens == 1,
          "callback stop: reason %d, %u tokens", st.stop_reason, st.generated_tokens);
    onestep_session_free(s);
}

/* ---- transcription (Whisper) ----------------------------------------------------------------- */

/* A 16-bit PCM mono WAV with the plain 44-byte header (the fixtures'), as floats in [-1, 1).
 * Returns NULL (and fails a check) on anything else. */
static float *read_wav16(const char *path, size_t *n, uint32_t *rate) {
    size_t len = 0;
    unsigned char *b = (unsigned char *)read_file(path, &len);
    CHECK(b != NULL, "cannot read %s", path);
    if (!b) return NULL;
#define U16(o) ((uint32_t)b[o] | (uint32_t)b[(o) + 1] << 8)
#define U32(o) (U16(o) | U16((o) + 2) << 16)
    int ok = len >= 44 && memcmp(b, "RIFF", 4) == 0 && memcmp(b + 8, "WAVE", 4) == 0 &&
             memcmp(b + 12, "fmt ", 4) == 0 && U16(20) == 1 /* PCM */ && U16(22) == 1 /* mono */ &&
             U16(34) == 16 && memcmp(b + 36, "data", 4) == 0 && U32(40) <= len - 44;
    CHECK(ok, "%s is not a 44-byte-header 16-bit PCM mono WAV", path);
    float *out = NULL;
    if (ok) {
        *rate = U32(24);
        *n = U32(40) / 2;
        out = malloc((*n ? *n : 1) * sizeof *out);
        for (size_t i = 0; out && i < *n; i++)
            out[i] = (float)(int16_t)U16(44 + 2 * i) / 32768.0f;
    }
#undef U32
#undef U16
    free(b);
    return out;
}

typedef struct {
    char text[65536];
    size_t len;
    int pieces;
    int stop_after; /* return false on this piece (0: never) */
} Pieces;

static bool collect_text(const char *text, size_t text_len, void *user_data) {
    Pieces *c = user_data;
    CHECK(text != NULL, "piece text is NULL");
    CHECK(strlen(text) == text_len, "text_len %zu != strlen %zu", text_len, strlen(text));
    if (c->len + text_len < sizeof c->text) {
        memcpy(c->text + c->len, text, text_len);
        c->len += text_len;
        c->text[c->len] = '\0';
    }
    c->pieces++;
    return c->stop_after == 0 || c->pieces < c->stop_after;
}

/* `s` without leading and trailing spaces, copied into `out` (of `cap` bytes). */
static const char *trimmed(const char *s, char *out, size_t cap) {
    while (*s == ' ') s++;
    size_t n = strlen(s);
    while (n > 0 && s[n - 1] == ' ') n--;
    if (n >= cap) n = cap - 1;
    memcpy(out, s, n);
    out[n] = '\0';
    return out;
}

/* The transcript's "text" from its JSON (our own writer: no spaces, escaped quotes only in text). */
static const char *json_text(const char *json, char *out, size_t cap) {
    out[0] = '\0';
    const char *p = json ? strstr(json, "{\"text\":\"") : NULL;
    if (!p) return out;
    p += 9;
    size_t n = 0;
    while (*p && *p != '"' && n + 1 < cap) {
        if (*p == '\\' && p[1]) p++;
        out[n++] = *p++;
    }
    out[n] = '\0';
    return out;
}

typedef struct {
    OnestepTranscriber *t;
    sem_t go;
    sem_t cancelled;
    int pieces;
    OnestepStatus reentrant;
    char first[256];
} TCancelCtx;

static void *transcriber_canceller(void *arg) {
    TCancelCtx *ctx = arg;
    sem_wait(&ctx->go);
    onestep_transcriber_cancel(ctx->t);
    sem_post(&ctx->cancelled);
    return NULL;
}

/* On the first piece: a re-entrant call (busy), then the other thread cancels; wait until it has. */
static bool cancel_on_first(const char *text, size_t len, void *user_data) {
    TCancelCtx *ctx = user_data;
    if (++ctx->pieces == 1) {
        snprintf(ctx->first, sizeof ctx->first, "%.*s", (int)len, text);
        float z[16] = {0};
        ctx->reentrant = onestep_transcribe(ctx->t, z, 16, 16000, NULL, NULL, NULL, NULL);
        sem_post(&ctx->go);
        sem_wait(&ctx->cancelled);
    }
    return true;
}

static const char *EXPECT_01 = "Good morning, doctor Smith.";

/* Calls that refuse their arguments or stop before any audio is encoded (quick under valgrind). */
static void whisper_without_audio(OnestepTranscriber *t, float *pcm, size_t n, const OnestepTranscribeOptions *o) {
    uint32_t rate = onestep_transcriber_sample_rate(t);
    char *json = NULL;

    /* No samples: an empty transcript. */
    EXPECT_STATUS(onestep_transcribe(t, pcm, 0, rate, NULL, NULL, NULL, &json), ONESTEP_STATUS_OK);
    CHECK(json && strstr(json, "{\"text\":\"\",\"cancelled\":false,\"segments\":[]"), "empty: %s",
          json ? json : "");
    onestep_string_free(json);

    /* A cancel with nothing running stops the next call before it starts (and is consumed by it). */
    onestep_transcriber_cancel(t);
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, NULL, NULL, NULL, &json), ONESTEP_STATUS_OK);
    CHECK(json && strstr(json, "{\"text\":\"\",\"cancelled\":true,\"segments\":[]"), "pre-cancelled: %s",
          json ? json : "");
    onestep_string_free(json);

    /* Typed errors; json_out is reset to NULL on each. */
    json = (char *)0x1;
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, 44100, NULL, NULL, NULL, &json), ONESTEP_STATUS_INVALID_ARGUMENT);
    CHECK(json == NULL, "json_out not reset on failure");
    CHECK(strstr(onestep_last_error(), "44100") && strstr(onestep_last_error(), "16000"), "message: %s",
          onestep_last_error());
    EXPECT_STATUS(onestep_transcribe(t, NULL, n, rate, NULL, NULL, NULL, &json), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_transcribe(NULL, pcm, n, rate, NULL, NULL, NULL, &json), ONESTEP_STATUS_NULL_POINTER);
    /* More than 4 hours: refused before a sample is read. */
    EXPECT_STATUS(onestep_transcribe(t, pcm, (size_t)ONESTEP_TRANSCRIBE_MAX_SECONDS * 16000 + 1, rate, NULL,
                                     NULL, NULL, &json),
                  ONESTEP_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(onestep_last_error(), "at most") != NULL, "message: %s", onestep_last_error());
    float saved = pcm[1000];
    pcm[1000] = strtof("nan", NULL);
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, NULL, NULL, NULL, &json), ONESTEP_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(onestep_last_error(), "samples[1000]") != NULL, "message: %s", onestep_last_error());
    pcm[1000] = strtof("-inf", NULL);
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, NULL, NULL, NULL, &json), ONESTEP_STATUS_INVALID_ARGUMENT);
    pcm[1000] = saved;
    OnestepTranscribeOptions bad = *o;
    bad.max_tokens_per_window = 0;
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, &bad, NULL, NULL, &json), ONESTEP_STATUS_INVALID_ARGUMENT);
    bad = *o;
    bad.struct_size = 8;
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, &bad, NULL, NULL, &json), ONESTEP_STATUS_INVALID_ARGUMENT);
    bad = *o;
    bad.language = "\xff\xfe";
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, &bad, NULL, NULL, &json), ONESTEP_STATUS_INVALID_UTF8);
    CHECK(json == NULL, "json_out set on failure");
}

/* speech_01.wav transcribed: streamed, with options, stopped by the callback. */
static void whisper_short_clip(OnestepTranscriber *t, float *pcm, size_t n, const OnestepTranscribeOptions *o) {
    uint32_t rate = onestep_transcriber_sample_rate(t);
    char buf[65536], buf2[65536];
    /* The clip, streamed: the text is the fixture's (faster-whisper's), the pieces concatenate to it. */
    Pieces *c = calloc(1, sizeof *c);
    char *json = (char *)0x1;
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, o, collect_text, c, &json), ONESTEP_STATUS_OK);
    CHECK(json != NULL && json != (char *)0x1, "no json_out");
    if (json == (char *)0x1) json = NULL;
    printf("whisper: speech_01.wav -> '%s' (%d pieces)\nwhisper: json %s\n", c->text, c->pieces,
           json ? json : "(none)");
    CHECK(strcmp(json_text(json, buf, sizeof buf), EXPECT_01) == 0, "text '%s', want '%s'", buf, EXPECT_01);
    CHECK(strcmp(trimmed(c->text, buf2, sizeof buf2), EXPECT_01) == 0, "pieces '%s', want '%s'", c->text,
          EXPECT_01);
    CHECK(c->pieces >= 2, "only %d pieces streamed", c->pieces);
    /* Timed (the default): faster-whisper's segment, its timestamp tokens <|0.00|> .. <|2.00|> included. */
    CHECK(json && strstr(json, "\"cancelled\":false") && strstr(json, "\"windows\":1") &&
              strstr(json, "{\"start\":0,\"end\":2,") &&
              strstr(json, "\"tokens\":[50363,4599,3329,11,6253,4176,13,50463]"),
          "json: %s", json ? json : "");
    onestep_string_free(json);

    /* Untimed: the same text, one segment for the window's 2.16 s, no timestamp tokens. */
    OnestepTranscribeOptions untimed = *o;
    untimed.timestamps = false;
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, &untimed, NULL, NULL, &json), ONESTEP_STATUS_OK);
    CHECK(json && strcmp(json_text(json, buf, sizeof buf), EXPECT_01) == 0 &&
              strstr(json, "{\"start\":0,\"end\":2.16,") &&
              strstr(json, "\"tokens\":[4599,3329,11,6253,4176,13]"),
          "untimed json: %s", json ? json : "");
    onestep_string_free(json);

    /* NULL options, callback and json_out: the same work, nothing returned. */
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, NULL, NULL, NULL, NULL), ONESTEP_STATUS_OK);

    /* Two tokens a window, untimed: " Good morning". */
    OnestepTranscribeOptions o2 = untimed;
    o2.max_tokens_per_window = 2;
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, &o2, NULL, NULL, &json), ONESTEP_STATUS_OK);
    CHECK(strcmp(json_text(json, buf, sizeof buf), "Good morning") == 0, "2 tokens: '%s'", buf);
    onestep_string_free(json);

    /* The callback stops at its first piece: OK, cancelled, the text so far. */
    memset(c, 0, sizeof *c);
    c->stop_after = 1;
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, rate, o, collect_text, c, &json), ONESTEP_STATUS_OK);
    CHECK(c->pieces == 1, "%d pieces after the callback stopped", c->pieces);
    CHECK(json && strstr(json, "\"cancelled\":true"), "json: %s", json ? json : "");
    CHECK(strcmp(json_text(json, buf, sizeof buf), trimmed(c->text, buf2, sizeof buf2)) == 0 &&
              strlen(buf) < strlen(EXPECT_01),
          "stopped text '%s', piece '%s'", buf, c->text);
    onestep_string_free(json);
    free(c);
}

/* speech_long.wav (two windows): whole, then cancelled from another thread at the first piece. */
static void whisper_long_clip(OnestepTranscriber *t, const char *dir) {
    char path[4096], buf[65536], buf2[65536];
    size_t n = 0;
    uint32_t wav_rate = 0;
    char *json = NULL;
    snprintf(path, sizeof path, "%s/speech_long.wav", dir);
    float *pcm = read_wav16(path, &n, &wav_rate);
    if (!pcm) return;
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, wav_rate, NULL, NULL, NULL, &json), ONESTEP_STATUS_OK);
    char *whole = strdup(json_text(json, buf, sizeof buf));
    CHECK(json && strstr(json, "\"windows\":2") && strstr(json, "\"cancelled\":false"), "long: %s",
          json ? json : "");
    CHECK(strncmp(whole, "In 2023 the company sold", 24) == 0 && strlen(whole) > 300, "long text: '%s'", whole);
    printf("whisper: speech_long.wav (%.1f s) -> %zu characters: '%.60s...'\n", (double)n / wav_rate,
           strlen(whole), whole);
    onestep_string_free(json);

    TCancelCtx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.t = t;
    sem_init(&ctx.go, 0, 0);
    sem_init(&ctx.cancelled, 0, 0);
    pthread_t th;
    pthread_create(&th, NULL, transcriber_canceller, &ctx);
    EXPECT_STATUS(onestep_transcribe(t, pcm, n, wav_rate, NULL, cancel_on_first, &ctx, &json), ONESTEP_STATUS_OK);
    pthread_join(th, NULL);
    CHECK(ctx.pieces == 1, "%d pieces after a cancel at the first", ctx.pieces);
    CHECK(ctx.reentrant == ONESTEP_STATUS_BUSY, "re-entrant call: %s", onestep_status_name(ctx.reentrant));
    json_text(json, buf, sizeof buf);
    CHECK(json && strstr(json, "\"cancelled\":true") && strstr(json, "\"windows\":1"), "cancelled: %s",
          json ? json : "");
    CHECK(strcmp(buf, trimmed(ctx.first, buf2, sizeof buf2)) == 0, "cancelled text '%s', first piece '%s'", buf,
          ctx.first);
    CHECK(strlen(buf) < strlen(whole) && strncmp(whole, buf, strlen(buf)) == 0,
          "cancelled text '%s' is not a shorter prefix of '%s'", buf, whole);
    printf("whisper: cancelled from another thread after the first piece: '%s'\n", buf);
    onestep_string_free(json);
    sem_destroy(&ctx.go);
    sem_destroy(&ctx.cancelled);
    free(whole);
    free(pcm);
}

/* WHISPER_MODE: full (default), short (no speech_long.wav), quick (no call that encodes audio). */
static void test_whisper(const char *whisper_path, OnestepModel *text_model) {
    const char *dir = getenv("ONESTEP_WHISPER_FIXTURES");
    if (!dir || !*dir) dir = "tests/fixtures/whisper";
    const char *mode = getenv("WHISPER_MODE");
    if (!mode || !*mode) mode = "full";
    int quick = strcmp(mode, "quick") == 0, full = strcmp(mode, "full") == 0;
    CHECK(quick || full || strcmp(mode, "short") == 0, "WHISPER_MODE=%s: want full, short or quick", mode);
    char path[4096];

    /* A text model is not a transcription model; NULLs are refused. */
    OnestepTranscriber *t = (OnestepTranscriber *)0x1;
    EXPECT_STATUS(onestep_transcriber_new(text_model, &t), ONESTEP_STATUS_INVALID_ARGUMENT);
    CHECK(t == NULL, "transcriber_out not reset on failure");
    CHECK(strstr(onestep_last_error(), "transcription") != NULL, "message: %s", onestep_last_error());
    EXPECT_STATUS(onestep_transcriber_new(NULL, &t), ONESTEP_STATUS_NULL_POINTER);
    EXPECT_STATUS(onestep_transcriber_new(text_model, NULL), ONESTEP_STATUS_NULL_POINTER);
    onestep_transcriber_free(NULL);
    onestep_transcriber_cancel(NULL);
    CHECK(onestep_transcriber_sample_rate(NULL) == 0, "sample rate of NULL");
    EXPECT_STATUS(onestep_transcribe_options_default(NULL), ONESTEP_STATUS_NULL_POINTER);

    OnestepModel *wm = NULL;
    OnestepStatus st = onestep_model_load(whisper_path, &wm);
    CHECK(st == ONESTEP_STATUS_OK, "load %s: %s: %s", whisper_path, onestep_status_name(st),
          onestep_last_error());
    if (!wm) return;
    /* A text session over a transcription model (no audio encoded): a typed result, never a panic. */
    {
        OnestepSession *s = NULL;
        OnestepStatus ss = onestep_session_new(wm, &s);
        if (ss == ONESTEP_STATUS_OK) {
            OnestepOptions so = greedy(wm, 1);
            ss = onestep_session_generate(s, "hi", &so, NULL, NULL, NULL);
            onestep_session_free(s);
        }
        printf("whisper: a text session over it: %s%s%s\n", onestep_status_name(ss),
               ss == ONESTEP_STATUS_OK ? "" : ": ", ss == ONESTEP_STATUS_OK ? "" : onestep_last_error());
        CHECK(ss != ONESTEP_STATUS_PANIC && ss != ONESTEP_STATUS_INTERNAL, "text session over Whisper: %s",
              onestep_status_name(ss));
    }
    EXPECT_STATUS(onestep_transcriber_new(wm, &t), ONESTEP_STATUS_OK);
    onestep_model_free(wm); /* the transcriber keeps the model alive */
    if (!t) return;
    CHECK(onestep_transcriber_sample_rate(t) == 16000, "sample rate %u", onestep_transcriber_sample_rate(t));

    OnestepTranscribeOptions o;
    memset(&o, 0, sizeof o);
    o.struct_size = 4;
    EXPECT_STATUS(onestep_transcribe_options_default(&o), ONESTEP_STATUS_INVALID_ARGUMENT);
    o.struct_size = sizeof o;
    EXPECT_STATUS(onestep_transcribe_options_default(&o), ONESTEP_STATUS_OK);
    CHECK(o.language == NULL && !o.translate && o.max_tokens_per_window == 224 && o.timestamps,
          "defaults: language %p translate %d max %u timestamps %d", (const void *)o.language, o.translate,
          o.max_tokens_per_window, o.timestamps);

    size_t n = 0;
    uint32_t wav_rate = 0;
    snprintf(path, sizeof path, "%s/speech_01.wav", dir);
    float *pcm = read_wav16(path, &n, &wav_rate);
    if (pcm) {
        CHECK(wav_rate == 16000 && n == 34609, "%s: %u Hz, %zu samples", path, wav_rate, n);
        whisper_without_audio(t, pcm, n, &o);
        if (!quick) {
            whisper_short_clip(t, pcm, n, &o);
            /* After the errors and the stops the transcriber still works. */
            char *json = NULL, buf[256];
            EXPECT_STATUS(onestep_transcribe(t, pcm, n, 16000, NULL, NULL, NULL, &json), ONESTEP_STATUS_OK);
            CHECK(strcmp(json_text(json, buf, sizeof buf), EXPECT_01) == 0, "at the end: '%s'", buf);
            onestep_string_free(json);
        }
        free(pcm);
    }
    if (full)
        whisper_long_clip(t, dir);
    else
        printf("whisper: WHISPER_MODE=%s: %s skipped\n", mode,
               quick ? "every call that encodes audio" : "speech_long.wav (cancel from another thread)");
    onestep_transcriber_free(t);
}

/* ---- hostile files -------------------------------------------------------------------------- */

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Loads a hostile model (from `path`, or from `len` bytes at `buf` when `buf` is set) and, should that
 * work, opens a session and generates one token: returns the first non-OK status (OK if all worked). */
static OnestepStatus refuse(const char *path, const char *buf, size_t len) {
    OnestepModel *m = NULL;
    OnestepStatus st = buf ? onestep_model_load_from_memory((const uint8_t *)buf, len, path, &m)
                           : onestep_model_load(path, &m);
    if (st != ONESTEP_STATUS_OK) {
        CHECK(m == NULL, "model_out set on failure for %s", path);
        return st;
    }
    OnestepSession *s = NULL;
    st = onestep_session_new(m, &s);
    if (st == ONESTEP_STATUS_OK) {
        OnestepOptions o = greedy(m, 1);
        st = onestep_session_generate(s, "hi", &o, NULL, NULL, NULL);
        onestep_session_free(s);
    }
    onestep_model_free(m);
    return st;
}

static void test_hostile_dir(const char *dir, int required) {
    DIR *d = opendir(dir);
    if (!d) {
        if (required) CHECK(0, "cannot open %s", dir);
        else printf("hostile: %s absent; skipping the hostile corpus\n", dir);
        return;
    }
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!ends_with(e->d_name, ".onnx")) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        OnestepStatus st = refuse(path, NULL, 0);
        CHECK(st != ONESTEP_STATUS_OK && st != ONESTEP_STATUS_PANIC,
              "hostile %s: status %s, want a typed error", path, onestep_status_name(st));
        size_t len = 0;
        char *buf = read_file(path, &len);
        if (buf) {
            OnestepStatus st2 = refuse(e->d_name, buf, len);
            CHECK(st2 != ONESTEP_STATUS_OK && st2 != ONESTEP_STATUS_PANIC,
                  "hostile %s from memory: status %s, want a typed error", path, onestep_status_name(st2));
            free(buf);
        }
        n++;
    }
    closedir(d);
    printf("hostile: %d files in %s tried (path and memory)\n", n, dir);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.onnx WORKDIR [MAX_NEW_TOKENS]\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1];
    const char *workdir = argv[2];
    uint32_t max_new = argc > 3 ? (uint32_t)atoi(argv[3]) : 8;
    printf("onestep %s (C ABI %d)\n", onestep_version(), ONESTEP_ABI_VERSION);

    /* ONESTEP_C_DEVICE (cpu, gpu, auto, gpu:N): the device, through the load options. */
    OnestepLoadOptions lo;
    memset(&lo, 0, sizeof lo);
    lo.struct_size = sizeof lo;
    EXPECT_STATUS(onestep_load_options_default(&lo), ONESTEP_STATUS_OK);
    lo.device = getenv("ONESTEP_C_DEVICE");
    OnestepModel *model = NULL;
    OnestepStatus st = onestep_model_load_with(model_path, &lo, &model);
    if (st != ONESTEP_STATUS_OK) {
        fprintf(stderr, "cannot load %s: %s: %s\n", model_path, onestep_status_name(st), onestep_last_error());
        return 1;
    }
    const char *device = onestep_model_device(model);
    printf("device: %s\n", device);
    if (lo.device && strncmp(lo.device, "gpu", 3) == 0)
        CHECK(strcmp(device, "cpu") != 0, "asked for %s, runs on %s", lo.device, device);
    OnestepModelInfo info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT_STATUS(onestep_model_info(model, &info), ONESTEP_STATUS_OK);
    printf("model: %s, %u layers, vocab %u, cache %u, chat template %s, loaded in %.1f ms\n",
           onestep_model_architecture(model), info.num_layers, info.vocab_size, info.max_cache,
           info.has_chat_template ? "yes" : "no", info.load_ms);

    test_stream(model, max_new);
    test_cancel(model);
    test_errors(model, model_path, workdir);
    const char *whisper = getenv("WHISPER");
    if (whisper && *whisper)
        test_whisper(whisper, model);
    else
        printf("whisper: WHISPER not set; transcription not tested\n");

    /* Test-time hostile files of our own, then the committed corpus if present. */
    char own[4096];
    snprintf(own, sizeof own, "%s/hostile", workdir);
    test_hostile_dir(own, 1);
    const char *corpus = getenv("ONESTEP_HOSTILE_DIR");
    test_hostile_dir(corpus ? corpus : "tests/fixtures/hostile", 0);

    onestep_model_free(model);
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
