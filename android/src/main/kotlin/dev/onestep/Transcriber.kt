package dev.onestep

/** Options of one transcription (the C ABI's `OnestepTranscribeOptions`). */
data class TranscribeOptions @JvmOverloads constructor(
    /**
     * Language code (`en`, `de`, ...) of a multilingual model; null: English. Ignored by an English-only model; a
     * code a multilingual model does not know is [Status.INVALID_ARGUMENT].
     */
    val language: String? = null,
    /** Translate into English instead of transcribing (multilingual models; ignored otherwise). */
    val translate: Boolean = false,
    /** Most tokens one 30 s window's text may take (at least 1; 224 is half the decoder's positions, which also bound it). */
    val maxTokensPerWindow: Int = 224,
    /**
     * Segments timed by the model's timestamp tokens, windows following the last complete segment (as faster-whisper
     * does by default); false: one untimed segment a 30 s window.
     */
    val timestamps: Boolean = true,
)

/** A timed piece of a [Transcript]: the text between two timestamps, or (without timestamps) one window's. */
data class Segment(
    /** Start in seconds. */
    val start: Float,
    /** End in seconds. */
    val end: Float,
    /** The text, with its leading space as decoded. */
    val text: String,
    /** The tokens of the text (its timestamp tokens included). */
    val tokens: List<Int>,
    /** Mean log-probability of its window's chosen tokens (NaN if not finite). */
    val avgLogprob: Float,
    /** Probability of the no-speech token after its window's start token (NaN if not finite). */
    val noSpeechProb: Float,
)

/** Time and counts of one transcription. */
data class TranscribeStats(
    /** Seconds of audio. */
    val audioSeconds: Double,
    /** 30 s windows encoded. */
    val windows: Int,
    /** Seconds spent in the encoder. */
    val encodeSeconds: Double,
    /** Seconds spent in the decoder steps. */
    val decodeSeconds: Double,
    /** Tokens decoded (prompts not counted). */
    val tokens: Int,
    /** Audio seconds per wall second. */
    val realTimeFactor: Double,
)

/** The result of one transcription. */
data class Transcript(
    /** The segments' text joined, trimmed. */
    val text: String,
    /** Stopped by [Transcriber.cancel] or by the text callback: the transcript holds the text up to the stop. */
    val cancelled: Boolean,
    /** The segments, in time order. */
    val segments: List<Segment>,
    val stats: TranscribeStats,
    /** The same transcript as the C ABI's JSON (`onestep_transcribe` in onestep.h), which these fields are read from. */
    val json: String,
) {
    internal companion object {
        /** Reads the JSON the native side writes; anything else is a bug ([Status.INTERNAL]). */
        fun parse(json: String): Transcript {
            val root = Json.obj(Json.parse(json), "the transcript")
            val segments = Json.arr(Json.field(root, "segments"), "segments").map { v ->
                val s = Json.obj(v, "a segment")
                Segment(
                    Json.float(s, "start"), Json.float(s, "end"), Json.str(s, "text"),
                    Json.arr(Json.field(s, "tokens"), "tokens").map { Json.int(it, "a token") },
                    Json.float(s, "avg_logprob"), Json.float(s, "no_speech_prob"),
                )
            }
            val st = Json.obj(Json.field(root, "stats"), "stats")
            val stats = TranscribeStats(
                Json.double(st, "audio_s"), Json.int(Json.field(st, "windows"), "windows"),
                Json.double(st, "encode_s"), Json.double(st, "decode_s"),
                Json.int(Json.field(st, "tokens"), "tokens"), Json.double(st, "real_time_factor"),
            )
            return Transcript(Json.str(root, "text"), Json.bool(root, "cancelled"), segments, stats, json)
        }
    }
}

/** Receives each piece of transcript text from the native side; false stops. Internal: [Transcriber.transcribe]'s `onText`. */
internal fun interface TextListener {
    fun onText(text: String): Boolean
}

/**
 * Speech to text over a transcription model ([OneStep.transcriber]): the audio in 30 s windows, decoded greedily
 * (faster-whisper's `temperature=0, beam_size=1`). It keeps its own decoder state, reused call after call, and its
 * own reference to the model. Calls are made from one thread at a time (a second concurrent call, or one from the
 * text callback, is a [OneStepException] with [Status.BUSY]), except [cancel], which any thread may call while a
 * transcription runs. [close] waits for a running call to end.
 */
class Transcriber internal constructor(handle: Long) : AutoCloseable {
    private val guard = Guard(handle, "transcriber")

    /** The sample rate (samples per second) [transcribe] takes: 16000 for Whisper. */
    val sampleRate: Int = guard.use { Native.transcriberSampleRate(it) }

    /**
     * Transcribes mono [samples] (nominally in [-1, 1], finite) recorded at [sampleRate] Hz, which must be the
     * model's ([Transcriber.sampleRate]; resampling and mixing down to mono are the caller's): any other rate, a NaN
     * or infinite sample, more than 4 hours of audio or [TranscribeOptions.maxTokensPerWindow] below 1 is a
     * [OneStepException] with [Status.INVALID_ARGUMENT]. No samples give an empty transcript. [onText] sees each
     * piece of text as it is decoded (the pieces concatenate to the segments' text); returning false stops as
     * [cancel] does: the transcript so far, [Transcript.cancelled] true. An exception thrown by [onText] stops the
     * transcription and propagates. A failed step is [Status.RUNTIME]; the transcriber stays usable.
     */
    @JvmOverloads
    fun transcribe(
        samples: FloatArray,
        sampleRate: Int,
        options: TranscribeOptions = TranscribeOptions(),
        onText: (String) -> Boolean = { true },
    ): Transcript = guard.use { h ->
        val json = Native.transcribe(
            h, samples, sampleRate, options.language, options.translate, options.maxTokensPerWindow, options.timestamps,
            TextListener { onText(it) },
        )
        Transcript.parse(json)
    }

    /**
     * Stops the running transcription after the current token (its transcript so far comes back, cancelled); with
     * nothing running, the next transcription stops before it starts. Safe from any thread; no-op once closed.
     */
    fun cancel() = guard.useIfOpen { Native.transcriberCancel(it) }

    override fun close() = guard.close { Native.transcriberFree(it) }
}

/**
 * A reader of JSON text into maps, lists, strings, booleans, null and [Json.Num] (a number kept as its text, so that
 * an f32 reads back exactly). Enough for the transcript the native side writes; strict about the grammar.
 */
internal class Json private constructor(private val s: String) {
    /** A JSON number, as written. */
    class Num(val text: String)

    private var i = 0

    private fun fail(what: String): Nothing = throw OneStepException(Status.INTERNAL, "transcript JSON: $what at offset $i")

    private fun ws() {
        while (i < s.length && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++
    }

    private fun value(): Any? {
        ws()
        if (i >= s.length) fail("unexpected end")
        return when (s[i]) {
            '{' -> obj()
            '[' -> arr()
            '"' -> str()
            't' -> word("true", true)
            'f' -> word("false", false)
            'n' -> word("null", null)
            else -> num()
        }
    }

    private fun word(w: String, v: Any?): Any? {
        if (!s.startsWith(w, i)) fail("unexpected character '${s[i]}'")
        i += w.length
        return v
    }

    private fun obj(): Map<String, Any?> {
        val m = LinkedHashMap<String, Any?>()
        i++ // {
        ws()
        if (i < s.length && s[i] == '}') {
            i++
            return m
        }
        while (true) {
            ws()
            if (i >= s.length || s[i] != '"') fail("expected a key")
            val k = str()
            ws()
            if (i >= s.length || s[i] != ':') fail("expected ':'")
            i++
            m[k] = value()
            ws()
            if (i >= s.length) fail("unexpected end")
            when (s[i++]) {
                ',' -> continue
                '}' -> return m
                else -> { i--; fail("expected ',' or '}'") }
            }
        }
    }

    private fun arr(): List<Any?> {
        val a = ArrayList<Any?>()
        i++ // [
        ws()
        if (i < s.length && s[i] == ']') {
            i++
            return a
        }
        while (true) {
            a.add(value())
            ws()
            if (i >= s.length) fail("unexpected end")
            when (s[i++]) {
                ',' -> continue
                ']' -> return a
                else -> { i--; fail("expected ',' or ']'") }
            }
        }
    }

    private fun str(): String {
        val b = StringBuilder()
        i++ // opening quote
        while (true) {
            if (i >= s.length) fail("unterminated string")
            val c = s[i++]
            when {
                c == '"' -> return b.toString()
                c == '\\' -> {
                    if (i >= s.length) fail("unterminated escape")
                    when (val e = s[i++]) {
                        '"' -> b.append('"')
                        '\\' -> b.append('\\')
                        '/' -> b.append('/')
                        'b' -> b.append('\b')
                        'f' -> b.append('\u000C')
                        'n' -> b.append('\n')
                        'r' -> b.append('\r')
                        't' -> b.append('\t')
                        // One UTF-16 unit; a surrogate pair is two escapes, which join in the builder.
                        'u' -> {
                            if (i + 4 > s.length) fail("short \\u escape")
                            val code = s.substring(i, i + 4).toIntOrNull(16) ?: fail("bad \\u escape")
                            b.append(code.toChar())
                            i += 4
                        }
                        else -> { i--; fail("bad escape '\\$e'") }
                    }
                }
                c < ' ' -> { i--; fail("control character in a string") }
                else -> b.append(c)
            }
        }
    }

    private fun num(): Num {
        val start = i
        if (i < s.length && s[i] == '-') i++
        val intStart = i
        while (i < s.length && s[i].isAsciiDigit()) i++
        if (i == intStart) fail("unexpected character '${s[start]}'")
        if (s[intStart] == '0' && i - intStart > 1) fail("leading zero")
        if (i < s.length && s[i] == '.') {
            i++
            val f = i
            while (i < s.length && s[i].isAsciiDigit()) i++
            if (i == f) fail("no digits after '.'")
        }
        if (i < s.length && (s[i] == 'e' || s[i] == 'E')) {
            i++
            if (i < s.length && (s[i] == '+' || s[i] == '-')) i++
            val e = i
            while (i < s.length && s[i].isAsciiDigit()) i++
            if (i == e) fail("no digits in the exponent")
        }
        return Num(s.substring(start, i))
    }

    private fun Char.isAsciiDigit() = this in '0'..'9'

    companion object {
        /** The value [json] holds (the whole text: trailing characters are an error). */
        fun parse(json: String): Any? {
            val r = Json(json)
            val v = r.value()
            r.ws()
            if (r.i != json.length) r.fail("trailing characters")
            return v
        }

        private fun wrong(what: String, v: Any?): Nothing = throw OneStepException(
            Status.INTERNAL, "transcript JSON: $what is ${if (v is Num) v.text else v?.javaClass?.simpleName ?: "null"}",
        )

        /** [m]'s member [key], which must be there (null is a value). */
        fun field(m: Map<String, Any?>, key: String): Any? =
            if (m.containsKey(key)) m[key] else throw OneStepException(Status.INTERNAL, "transcript JSON: no \"$key\"")

        @Suppress("UNCHECKED_CAST")
        fun obj(v: Any?, what: String): Map<String, Any?> = v as? Map<String, Any?> ?: wrong(what, v)
        fun arr(v: Any?, what: String): List<Any?> = v as? List<Any?> ?: wrong(what, v)
        fun int(v: Any?, what: String): Int = (v as? Num)?.text?.toIntOrNull() ?: wrong(what, v)
        fun str(m: Map<String, Any?>, key: String): String = field(m, key) as? String ?: wrong(key, m[key])
        fun bool(m: Map<String, Any?>, key: String): Boolean = field(m, key) as? Boolean ?: wrong(key, m[key])

        /** A number; null (how a number that is not finite is written) is NaN. */
        fun double(m: Map<String, Any?>, key: String): Double = when (val v = field(m, key)) {
            null -> Double.NaN
            else -> (v as? Num)?.text?.toDoubleOrNull() ?: wrong(key, v)
        }

        /** As [double], read as a Float directly (the shortest form of an f32 reads back exactly). */
        fun float(m: Map<String, Any?>, key: String): Float = when (val v = field(m, key)) {
            null -> Float.NaN
            else -> (v as? Num)?.text?.toFloatOrNull() ?: wrong(key, v)
        }
    }
}
