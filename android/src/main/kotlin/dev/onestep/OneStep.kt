package dev.onestep

import java.util.concurrent.locks.ReentrantReadWriteLock
import kotlin.concurrent.read
import kotlin.concurrent.write

/** What kind of failure a [OneStepException] reports: the C ABI's `OnestepStatus` values, by name. */
enum class Status {
    /** An argument or option out of range (prompt longer than the cache, an unknown setting, ...). */
    INVALID_ARGUMENT,
    /** Reading the model file failed at the OS level. */
    IO,
    /** The bytes are not a valid onestep step graph (corrupt, truncated, wrong contract, over a limit). */
    INVALID_MODEL,
    /** Ops or an opset this runtime does not implement. */
    UNSUPPORTED,
    /** A step failed while running (the session's cache is reset; the session stays usable). */
    RUNTIME,
    /** Tokenizer failure. */
    TOKENIZER,
    /** Chat-template failure (or no chat template). */
    TEMPLATE,
    /** The session or transcriber is in use by another call (another thread, or a call from its own callback). */
    BUSY,
    /** The call does not fit the state (a closed handle, no generation in progress). */
    BAD_STATE,
    /** The operation was cancelled. */
    CANCELLED,
    /** The GPU cannot be used or failed (no adapter, a step its kernels do not take, its memory, device lost). */
    DEVICE,
    /** A broken invariant inside onestep: a bug, never the input's fault (please report the message). */
    INTERNAL,
}

/** A runtime error: [status] says what kind, the message what and where (file, tensor, op). */
class OneStepException(val status: Status, message: String) : RuntimeException(message) {
    /** From the native side, which names the status. */
    internal constructor(status: String, message: String) : this(Status.valueOf(status), message)
}

/** One chat message: `system`, `user`, `assistant`, ... */
data class ChatMessage(val role: String, val content: String)

/** Options of one generation; `null` fields take the model file's defaults. */
data class GenerateOptions(
    val maxNewTokens: Int? = null,
    /** `<= 0` is greedy. */
    val temperature: Float? = null,
    /** 0 disables. */
    val topK: Int? = null,
    /** In (0, 1]; 1 disables. */
    val topP: Float? = null,
    /** Same seed, prompt and options: same tokens. */
    val seed: Long? = null,
    /** Generation ends before the first of these strings. */
    val stopStrings: List<String> = emptyList(),
    /** Keep going past the model's stop tokens. */
    val ignoreStopTokens: Boolean = false,
) {
    companion object {
        /** Greedy decoding of at most [maxNewTokens] tokens. */
        @JvmStatic
        fun greedy(maxNewTokens: Int) = GenerateOptions(maxNewTokens = maxNewTokens, temperature = 0f)
    }
}

/** Receives each generated piece; return false to stop (the generation ends as cancelled). */
fun interface PieceListener {
    fun onPiece(text: String, tokenId: Int): Boolean
}

/** The result of one generation. */
data class Completion(
    val text: String,
    /** `stop_token`, `stop_string`, `max_tokens`, `context_full` or `cancelled`. */
    val stopReason: String,
    val promptTokens: Int,
    val reusedTokens: Int,
    val generatedTokens: Int,
    val timeToFirstTokenMs: Double,
    val decodeTokensPerSecond: Double,
)

/**
 * How a model is loaded.
 * - [device]: `cpu` (default), `auto` (the faster of the GPU and the CPU, timed over a few decode steps on the
 *   first load and remembered in the folder of the `gpu_pipeline_cache=DIR` setting — pass the app's cache
 *   directory; [OneStep.deviceNote] says what was measured), `gpu` (the best GPU; an error when none can be
 *   used) or `gpu:N`.
 * - [gpuBackend]: `vulkan`, `metal`, `dx12` or `gl`; null: any.
 * - [gpuCacheBudget]: GPU memory for one session's KV cache: `all`, bytes (`48M`, `1GiB`) or a share of the
 *   full cache (`50%`); the layers beyond it stay in host memory and stream through two GPU slots.
 * - [kvPageRows]: positions a host KV-cache page; 0: the default (64).
 * - [precision]: how the CPU multiplies 4- and 8-bit weights: `fast` (default: 8-bit activations, two 8-bit
 *   digits in decode and the output layer, integer dot products) or `exact` (f32 activations: onnxruntime's
 *   results to ~1e-4, the GPU kernels' math).
 * - [settings]: further settings as `key=value` pairs separated by commas: `profile=on` and the GPU tuning
 *   keys (`gpu_variant=lanes`, `gpu_run_ahead=off`, `gpu_pipeline_cache=<dir>` to keep compiled GPU
 *   pipelines between runs, e.g. `context.cacheDir`, ...; the list is in the README). Null: none.
 */
data class LoadOptions @JvmOverloads constructor(
    val device: String = "cpu",
    val gpuBackend: String? = null,
    val gpuCacheBudget: String = "all",
    val kvPageRows: Int = 0,
    val precision: String = "fast",
    val settings: String? = null,
)

/** A loaded model: immutable, shared by any number of [Session]s and [Transcriber]s on any threads. */
class OneStep private constructor(handle: Long) : AutoCloseable {
    private val guard = Guard(handle, "model")

    companion object {
        /** Memory-maps and loads the model file at [path]. */
        @JvmStatic
        @JvmOverloads
        fun load(path: String, options: LoadOptions = LoadOptions()): OneStep = OneStep(
            Native.modelLoad(
                path, options.device, options.gpuBackend, options.gpuCacheBudget, options.kvPageRows, options.precision,
                options.settings,
            ),
        )

        /** Loads a model from bytes (an Android asset, ...); [name] appears in error messages. */
        @JvmStatic
        @JvmOverloads
        fun load(bytes: ByteArray, name: String = "<memory>", options: LoadOptions = LoadOptions()): OneStep = OneStep(
            Native.modelLoadBytes(
                bytes, name, options.device, options.gpuBackend, options.gpuCacheBudget, options.kvPageRows,
                options.precision, options.settings,
            ),
        )
    }

    private val where: Array<String?> = guard.use { Native.modelDevice(it) }
    /** Where the model runs: `cpu`, or the GPU adapter and its API (`"Adreno (TM) 740 (Vulkan)"`). */
    val device: String get() = where[0] ?: "cpu"
    /**
     * How a model loaded with `device = "auto"` chose its device (the decode-step times measured or remembered,
     * or why the GPU could not be used); null when a device was forced.
     */
    val deviceNote: String? get() = where[1]

    private val info: LongArray = guard.use { Native.modelInfo(it) }
    val numLayers: Int get() = info[0].toInt()
    val vocabSize: Int get() = info[1].toInt()
    /** KV cache slots: prompt plus generated tokens of one conversation. */
    val maxCache: Int get() = info[2].toInt()
    val hasChatTemplate: Boolean get() = info[4] != 0L

    /** A new conversation over this model (it stays valid after the model is closed). */
    fun session(): Session = Session(guard.use { Native.sessionNew(it) })

    /**
     * A new [Transcriber] over this model, which must be a transcription model (Whisper exported by onestep-export;
     * else a [OneStepException] with [Status.INVALID_ARGUMENT]). It stays valid after the model is closed.
     */
    fun transcriber(): Transcriber = Transcriber(guard.use { Native.transcriberNew(it) })

    override fun close() = guard.close { Native.modelFree(it) }
}

/**
 * One conversation (one KV cache). Calls are made from one thread at a time, except [cancel], which any
 * thread may call while a generation runs. [close] waits for a running call to end.
 */
class Session internal constructor(handle: Long) : AutoCloseable {
    private val guard = Guard(handle, "session")

    /** Generates a continuation of [prompt] from an empty cache; [onPiece] sees each text piece. */
    @JvmOverloads
    fun generate(prompt: String, options: GenerateOptions = GenerateOptions(), onPiece: (String) -> Unit = {}): Completion =
        run(prompt, null, options, PieceListener { t, _ -> onPiece(t); true })

    /** As [generate], with a listener that also gets token ids and may stop the generation. */
    fun generate(prompt: String, options: GenerateOptions, listener: PieceListener): Completion =
        run(prompt, null, options, listener)

    /** The assistant's reply to [messages]; a conversation growing turn by turn reuses its cache. */
    @JvmOverloads
    fun chat(messages: List<ChatMessage>, options: GenerateOptions = GenerateOptions(), onPiece: (String) -> Unit = {}): Completion =
        run(null, messages, options, PieceListener { t, _ -> onPiece(t); true })

    /** [generate] as a lazy sequence of text pieces (pulled one token at a time). */
    @JvmOverloads
    fun stream(prompt: String, options: GenerateOptions = GenerateOptions()): Sequence<String> = pull(prompt, null, options)

    /** [chat] as a lazy sequence of text pieces. */
    @JvmOverloads
    fun chatStream(messages: List<ChatMessage>, options: GenerateOptions = GenerateOptions()): Sequence<String> =
        pull(null, messages, options)

    /** Why the last finished generation ended (`null` before the first); after a [stream] is read to its end too. */
    fun lastStopReason(): String? = guard.use { Native.sessionLastStopReason(it) }

    /** Stops the running generation before its next step (safe from any thread; no-op once closed). */
    fun cancel() = guard.useIfOpen { Native.sessionCancel(it) }

    /** Forgets the conversation. */
    fun reset() = guard.use { Native.sessionReset(it) }

    override fun close() = guard.close { Native.sessionFree(it) }

    private fun run(prompt: String?, messages: List<ChatMessage>?, o: GenerateOptions, listener: PieceListener): Completion =
        guard.use { h ->
            val text = Native.sessionGenerate(
                h, prompt, messages?.map { it.role }?.toTypedArray(), messages?.map { it.content }?.toTypedArray(),
                o.maxNewTokens ?: -1, o.temperature ?: Float.NaN, o.topK ?: -1, o.topP ?: Float.NaN,
                o.seed != null, o.seed ?: 0L, o.stopStrings.toTypedArray(), o.ignoreStopTokens, listener,
            )
            val s = Native.sessionLastStats(h) ?: throw OneStepException(Status.INTERNAL, "no statistics after a generation")
            Completion(text, Native.sessionLastStopReason(h) ?: "", s[0].toInt(), s[1].toInt(), s[2].toInt(), s[3], s[6])
        }

    private fun pull(prompt: String?, messages: List<ChatMessage>?, o: GenerateOptions): Sequence<String> {
        guard.use { h ->
            Native.sessionStart(
                h, prompt, messages?.map { it.role }?.toTypedArray(), messages?.map { it.content }?.toTypedArray(),
                o.maxNewTokens ?: -1, o.temperature ?: Float.NaN, o.topK ?: -1, o.topP ?: Float.NaN,
                o.seed != null, o.seed ?: 0L, o.stopStrings.toTypedArray(), o.ignoreStopTokens,
            )
        }
        return generateSequence { guard.use { Native.sessionNextPiece(it) } }
    }
}

/** A native handle: calls hold the read lock, close takes the write lock (so it waits for calls). */
internal class Guard(private var handle: Long, private val what: String) {
    private val lock = ReentrantReadWriteLock()

    fun <T> use(f: (Long) -> T): T = lock.read {
        check(handle != 0L) { "the $what is closed" }
        f(handle)
    }

    fun useIfOpen(f: (Long) -> Unit) = lock.read { if (handle != 0L) f(handle) }

    fun close(free: (Long) -> Unit) = lock.write {
        if (handle != 0L) {
            free(handle)
            handle = 0L
        }
    }
}
