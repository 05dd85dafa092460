// Desktop JVM test of the Kotlin API over the JNI library (run by android/test-jvm):
//   java -Djava.library.path=LIBDIR -cp test.jar OneStepJvmTestKt MODEL.onnx OWN_HOSTILE_DIR [CORPUS_DIR [WHISPER.onnx]]
// With a Whisper export (WHISPER.onnx not empty), the transcription API is tested on tests/fixtures/whisper.
import dev.onestep.ChatMessage
import dev.onestep.GenerateOptions
import dev.onestep.LoadOptions
import dev.onestep.OneStep
import dev.onestep.OneStepException
import dev.onestep.Status
import dev.onestep.PieceListener
import dev.onestep.TranscribeOptions
import dev.onestep.Transcript
import java.io.File
import kotlin.system.exitProcess

var checks = 0
var failures = 0

fun check(cond: Boolean, msg: () -> String) {
    checks++
    if (!cond) {
        failures++
        System.err.println("FAIL: ${msg()}")
    }
}

/** Runs [f], which must throw a OneStepException of [status] whose message contains [needle]. */
fun expectOneStepError(what: String, needle: String, status: Status, f: () -> Unit) {
    try {
        f()
        check(false) { "$what: no exception" }
    } catch (e: OneStepException) {
        check(e.message.orEmpty().contains(needle)) { "$what: message '${e.message}' lacks '$needle'" }
        check(e.status == status) { "$what: status ${e.status}, expected $status (${e.message})" }
        println("$what -> OneStepException ${e.status}: ${e.message}")
    } catch (e: Throwable) {
        check(false) { "$what: ${e.javaClass.name} instead of OneStepException: ${e.message}" }
    }
}

fun hostile(dir: File, required: Boolean) {
    val files = dir.listFiles { f -> f.name.endsWith(".onnx") }
    if (files == null) {
        check(!required) { "cannot list $dir" }
        println("hostile: $dir absent; skipping the hostile corpus")
        return
    }
    for (f in files.sortedBy { it.name }) {
        for (fromBytes in listOf(false, true)) {
            try {
                // Refused at load, at session creation, or at the first step: any is fine, if typed.
                val m = if (fromBytes) OneStep.load(f.readBytes(), f.name) else OneStep.load(f.path)
                m.use { it.session().use { s -> s.generate("hi", GenerateOptions.greedy(1)) } }
                check(false) { "hostile ${f.name} loaded and ran (fromBytes=$fromBytes)" }
            } catch (e: OneStepException) {
                // the typed error we want; never a bug
                check(e.status != Status.INTERNAL) { "hostile ${f.name}: internal error: ${e.message}" }
            } catch (e: Throwable) {
                check(false) { "hostile ${f.name}: ${e.javaClass.name} instead of OneStepException: ${e.message}" }
            }
        }
    }
    println("hostile: ${files.size} files in $dir tried (path and bytes)")
}

/** A 16-bit PCM mono WAV with the canonical 44-byte header (the fixtures'), as floats in [-1, 1), and its rate. */
fun readWav16(f: File): Pair<FloatArray, Int> {
    val b = f.readBytes()
    fun u16(o: Int) = (b[o].toInt() and 0xff) or ((b[o + 1].toInt() and 0xff) shl 8)
    fun u32(o: Int) = u16(o).toLong() or (u16(o + 2).toLong() shl 16)
    fun tag(o: Int, t: String) = String(b, o, 4, Charsets.US_ASCII) == t
    val ok = b.size >= 44 && tag(0, "RIFF") && tag(8, "WAVE") && tag(12, "fmt ") && u16(20) == 1 /* PCM */ &&
        u16(22) == 1 /* mono */ && u16(34) == 16 && tag(36, "data") && u32(40) <= b.size - 44L
    require(ok) { "$f is not a 44-byte-header 16-bit PCM mono WAV" }
    val n = (u32(40) / 2).toInt()
    return FloatArray(n) { u16(44 + 2 * it).toShort() / 32768f } to u32(24).toInt()
}

const val EXPECT_01 = "Good morning, doctor Smith."

/** The transcription API on speech_01.wav: what the C test checks (capi/tests/c/capi_test.c, whisper_*). */
fun whisper(path: String, textModel: OneStep) {
    if (path.isEmpty() || !File(path).isFile) {
        println("whisper: no Whisper export${if (path.isEmpty()) "" else " at $path"}; transcription not tested")
        return
    }
    // The transcript JSON reader: escapes, a number that is not finite (null).
    val parsed = Transcript.parse(
        "{\"text\":\"a \\\"b\\\"\\\\\\n\\u0001é\\ud83d\\ude00\",\"cancelled\":true,\"segments\":[{\"start\":0,\"end\":2.16," +
            "\"text\":\" Hi.\",\"tokens\":[50363,17250,13],\"avg_logprob\":-0.25,\"no_speech_prob\":null}],\"stats\":" +
            "{\"audio_s\":0,\"windows\":0,\"encode_s\":0,\"decode_s\":0,\"tokens\":0,\"real_time_factor\":null}}",
    )
    check(parsed.text == "a \"b\"\\\n\u0001é\ud83d\ude00" && parsed.cancelled) { "parsed text '${parsed.text}'" }
    val ps = parsed.segments.single()
    check(ps.end == 2.16f && ps.tokens == listOf(50363, 17250, 13) && ps.avgLogprob == -0.25f && ps.noSpeechProb.isNaN()) {
        "parsed segment $ps"
    }
    check(parsed.stats.realTimeFactor.isNaN()) { "parsed stats ${parsed.stats}" }
    expectOneStepError("malformed transcript JSON", "offset", Status.INTERNAL) { Transcript.parse("{\"text\":\"a\",}") }

    // A text model is not a transcription model.
    expectOneStepError("transcriber over a text model", "transcription", Status.INVALID_ARGUMENT) { textModel.transcriber() }

    val wm = OneStep.load(path)
    val t = wm.transcriber()
    wm.close() // the transcriber keeps the model alive
    check(t.sampleRate == 16000) { "sample rate ${t.sampleRate}" }
    val (pcm, rate) = readWav16(File("tests/fixtures/whisper/speech_01.wav"))
    check(rate == 16000 && pcm.size == 34609) { "speech_01.wav: $rate Hz, ${pcm.size} samples" }
    val d = TranscribeOptions()
    check(d.language == null && !d.translate && d.maxTokensPerWindow == 224 && d.timestamps) { "defaults $d" }

    // Timed (the default), streamed: faster-whisper's segment, its timestamp tokens <|0.00|> .. <|2.00|> included.
    val pieces = ArrayList<String>()
    val timed = t.transcribe(pcm, rate) { pieces.add(it); true }
    println("whisper: speech_01.wav -> '${timed.text}' (${pieces.size} pieces: ${pieces.joinToString("|")})")
    println("whisper: segments ${timed.segments}")
    println("whisper: stats ${timed.stats}")
    check(timed.text == EXPECT_01 && !timed.cancelled) { "text '${timed.text}' cancelled ${timed.cancelled}" }
    check(pieces.joinToString("").trim() == EXPECT_01 && pieces.size >= 2) { "pieces $pieces" }
    val seg = timed.segments.singleOrNull()
    check(seg != null && seg.start == 0f && seg.end == 2f && seg.text.trim() == EXPECT_01 &&
        seg.tokens == listOf(50363, 4599, 3329, 11, 6253, 4176, 13, 50463)) { "timed segments ${timed.segments}" }
    check(seg != null && seg.avgLogprob < 0f && seg.noSpeechProb in 0f..1f) { "segment probabilities $seg" }
    check(timed.stats.windows == 1 && timed.stats.tokens > 0 && Math.abs(timed.stats.audioSeconds - 34609 / 16000.0) < 1e-6 &&
        timed.stats.realTimeFactor > 0) { "stats ${timed.stats}" }
    check(timed.json.startsWith("{\"text\":\"$EXPECT_01\",\"cancelled\":false,")) { "json ${timed.json}" }

    // Untimed: the same text, one segment for the window's 2.16 s, no timestamp tokens.
    val untimed = t.transcribe(pcm, rate, TranscribeOptions(timestamps = false))
    val useg = untimed.segments.singleOrNull()
    check(untimed.text == EXPECT_01 && useg != null && useg.start == 0f && useg.end == 2.16f &&
        useg.tokens == listOf(4599, 3329, 11, 6253, 4176, 13)) { "untimed: $untimed" }
    println("whisper: untimed -> '${untimed.text}', segments ${untimed.segments}")

    // Two tokens a window, untimed: " Good morning".
    val two = t.transcribe(pcm, rate, TranscribeOptions(maxTokensPerWindow = 2, timestamps = false))
    check(two.text == "Good morning") { "2 tokens: '${two.text}'" }
    // A language on an English-only model is ignored (unknown codes too): the same transcript.
    val lang = t.transcribe(pcm, rate, TranscribeOptions(language = "xx", translate = true))
    check(lang.text == EXPECT_01 && lang.segments.map { it.tokens } == timed.segments.map { it.tokens }) { "language xx: $lang" }
    println("whisper: maxTokensPerWindow 2 -> '${two.text}'; language \"xx\" on English-only -> '${lang.text}'")

    // onText returning false stops at that piece: cancelled, the text so far.
    var first = ""
    val stopped = t.transcribe(pcm, rate) { first = it; false }
    check(stopped.cancelled && stopped.text == first.trim() && stopped.text.length < EXPECT_01.length &&
        EXPECT_01.startsWith(stopped.text)) { "callback stop: '${stopped.text}' (first piece '$first')" }
    println("whisper: onText returned false at the first piece -> cancelled, '${stopped.text}'")

    // Cancel from another thread at the first piece; a call from the callback finds the transcriber busy.
    var n = 0
    var reentrant: Status? = null
    val cancelled = t.transcribe(pcm, rate) {
        if (++n == 1) {
            try {
                t.transcribe(FloatArray(16), rate)
            } catch (e: OneStepException) {
                reentrant = e.status
            }
            Thread { t.cancel() }.apply { start(); join() }
        }
        true
    }
    check(cancelled.cancelled && n == 1 && cancelled.text.length < EXPECT_01.length) { "thread cancel after $n pieces: $cancelled" }
    check(reentrant == Status.BUSY) { "re-entrant call: $reentrant" }
    println("whisper: cancelled from another thread after the first piece: '${cancelled.text}'; re-entrant call -> $reentrant")

    // An exception in onText propagates as itself; the transcriber stays usable.
    try {
        t.transcribe(pcm, rate) { throw IllegalArgumentException("from onText") }
        check(false) { "onText exception swallowed" }
    } catch (e: IllegalArgumentException) {
        check(e.message == "from onText") { "onText exception: ${e.message}" }
    }

    // Calls that stop before any audio is encoded: no samples, a cancel sent while nothing ran (consumed by it).
    val empty = t.transcribe(FloatArray(0), rate)
    check(empty.text == "" && !empty.cancelled && empty.segments.isEmpty() && empty.stats.windows == 0) { "empty: $empty" }
    t.cancel()
    val pre = t.transcribe(pcm, rate)
    check(pre.text == "" && pre.cancelled && pre.segments.isEmpty() && pre.stats.windows == 0) { "pre-cancelled: $pre" }

    // Typed errors.
    expectOneStepError("wrong sample rate", "8000", Status.INVALID_ARGUMENT) { t.transcribe(pcm, 8000) }
    expectOneStepError("negative sample rate", "-1", Status.INVALID_ARGUMENT) { t.transcribe(pcm, -1) }
    val nan = pcm.copyOf().also { it[1000] = Float.NaN }
    expectOneStepError("NaN sample", "samples[1000]", Status.INVALID_ARGUMENT) { t.transcribe(nan, rate) }
    expectOneStepError("0 tokens a window", "max_tokens_per_window", Status.INVALID_ARGUMENT) {
        t.transcribe(pcm, rate, TranscribeOptions(maxTokensPerWindow = 0))
    }
    expectOneStepError("negative tokens a window", "max_tokens_per_window", Status.INVALID_ARGUMENT) {
        t.transcribe(pcm, rate, TranscribeOptions(maxTokensPerWindow = -3))
    }

    // After the errors and the stops it still works.
    check(t.transcribe(pcm, rate).text == EXPECT_01) { "transcriber unusable after errors" }

    // Closed handles are refused in Kotlin, before reaching native code.
    t.close()
    t.close() // idempotent
    t.cancel() // no-op once closed
    try {
        t.transcribe(pcm, rate)
        check(false) { "transcribe on a closed transcriber" }
    } catch (e: IllegalStateException) {
        check(e.message.orEmpty().contains("closed")) { "closed transcriber: ${e.message}" }
    }
    try {
        wm.transcriber()
        check(false) { "transcriber of a closed model" }
    } catch (e: IllegalStateException) {
        // expected
    }
    println("whisper: closed transcriber and model refused")
}

fun main(args: Array<String>) {
    val modelPath = args[0]
    val model = OneStep.load(modelPath)
    println("model: ${model.numLayers} layers, vocab ${model.vocabSize}, cache ${model.maxCache}, chat ${model.hasChatTemplate}")
    val greedy = GenerateOptions.greedy(12)

    model.session().use { s ->
        // Callback streaming.
        val pieces = StringBuilder()
        print("reply: ")
        val c = s.generate("The capital of France is", greedy) { piece ->
            print(piece)
            pieces.append(piece)
        }
        println()
        check(c.text == pieces.toString()) { "pieces '${pieces}' != text '${c.text}'" }
        check(c.text.isNotBlank()) { "empty reply" }
        check(c.stopReason == "max_tokens" || c.stopReason == "stop_token") { "stop reason ${c.stopReason}" }
        check(c.generatedTokens in 1..12) { "generated ${c.generatedTokens}" }
        println("completion: $c")

        // Pull streaming (Sequence) gives the same greedy text.
        val pulled = s.stream("The capital of France is", greedy).joinToString("")
        check(pulled == c.text) { "sequence '$pulled' != callback '${c.text}'" }
        check(s.lastStopReason() == c.stopReason) { "sequence stop ${s.lastStopReason()}" }

        // Chat, two turns: the second reuses the cache.
        if (model.hasChatTemplate) {
            val short = GenerateOptions.greedy(4)
            val r1 = s.chat(listOf(ChatMessage("user", "Hi")), short)
            val r2 = s.chat(listOf(ChatMessage("user", "Hi"), ChatMessage("assistant", r1.text), ChatMessage("user", "Go")), short)
            check(r2.reusedTokens > 0) { "second chat turn reused nothing" }
            println("chat: '${r1.text}' / '${r2.text}' (${r2.reusedTokens} tokens reused)")
            check(s.chatStream(listOf(ChatMessage("user", "Hi")), short).joinToString("") == r1.text) { "chatStream differs" }
        }

        // Cancel from another thread at the second piece.
        var n = 0
        val cancelled = s.generate("Count: one, two, three,", GenerateOptions(maxNewTokens = 50, temperature = 0f, ignoreStopTokens = true),
            PieceListener { _, _ ->
                if (++n == 2) Thread { s.cancel() }.apply { start(); join() }
                true
            })
        check(cancelled.stopReason == "cancelled" && cancelled.generatedTokens == 2) { "cancel: $cancelled" }
        println("cancel: stopped after ${cancelled.generatedTokens} tokens from another thread")

        // A listener returning false stops; an exception in the listener propagates as itself.
        val stopped = s.generate("Hello", greedy, PieceListener { _, _ -> false })
        check(stopped.stopReason == "cancelled" && stopped.generatedTokens == 1) { "listener stop: $stopped" }
        try {
            s.generate("Hello", greedy) { throw IllegalArgumentException("from the listener") }
            check(false) { "listener exception swallowed" }
        } catch (e: IllegalArgumentException) {
            check(e.message == "from the listener") { "listener exception: ${e.message}" }
        }
        check(s.generate("Hello", GenerateOptions.greedy(2)).generatedTokens >= 1) { "session unusable after a listener exception" }

        // Runtime errors are OneStepExceptions with the runtime's message; the session stays usable.
        expectOneStepError("prompt longer than the cache", "cache", Status.INVALID_ARGUMENT) {
            s.generate("hello ".repeat(model.maxCache + 8), greedy)
        }
        expectOneStepError("bad options", "top_p", Status.INVALID_ARGUMENT) { s.generate("hi", GenerateOptions(topP = 2f)) }
        expectOneStepError("bad options in stream()", "max_new_tokens", Status.INVALID_ARGUMENT) { s.stream("hi", GenerateOptions(maxNewTokens = 0)) }
        check(s.generate("Hello", GenerateOptions.greedy(2)).generatedTokens >= 1) { "session unusable after errors" }
    }

    // Load from bytes (the model outlives the array), bad files, truncated bytes.
    val bytes = File(modelPath).readBytes()
    OneStep.load(bytes, "in-memory").use { m -> m.session().use { s -> check(s.generate("Hello", GenerateOptions.greedy(2)).text.isNotEmpty()) { "bytes model" } } }
    expectOneStepError("missing file", "does-not-exist.onnx", Status.IO) { OneStep.load("/nonexistent/does-not-exist.onnx") }
    // Load options: the device and the KV cache; strings that do not parse are errors naming them.
    OneStep.load(modelPath, LoadOptions(device = "cpu", gpuCacheBudget = "50%", kvPageRows = 16, precision = "exact", settings = "profile=on")).use { m ->
        check(m.device == "cpu" && m.deviceNote == null) { "device ${m.device} / ${m.deviceNote}" }
        m.session().use { s -> check(s.generate("Hello", GenerateOptions.greedy(2)).text.isNotEmpty()) { "options model" } }
    }
    expectOneStepError("bad device", "tpu", Status.INVALID_ARGUMENT) { OneStep.load(modelPath, LoadOptions(device = "tpu")) }
    expectOneStepError("bad budget", "lots", Status.INVALID_ARGUMENT) { OneStep.load(bytes, "b", LoadOptions(gpuCacheBudget = "lots")) }
    expectOneStepError("bad backend", "glide", Status.INVALID_ARGUMENT) { OneStep.load(modelPath, LoadOptions(gpuBackend = "glide")) }
    expectOneStepError("negative page rows", "kvPageRows", Status.INVALID_ARGUMENT) { OneStep.load(modelPath, LoadOptions(kvPageRows = -1)) }
    expectOneStepError("bad precision", "sloppy", Status.INVALID_ARGUMENT) { OneStep.load(modelPath, LoadOptions(precision = "sloppy")) }
    expectOneStepError("unknown setting", "colour", Status.INVALID_ARGUMENT) { OneStep.load(modelPath, LoadOptions(settings = "profile=on,colour=blue")) }
    if (System.getenv("ONESTEP_REQUIRE_GPU") == "1") {
        OneStep.load(modelPath, LoadOptions(device = "gpu")).use { m ->
            check(m.device != "cpu") { "device gpu runs on ${m.device}" }
            println("gpu: ${m.device}")
        }
        // `auto` times both devices (lavapipe allowed into the trial) and says what it measured.
        val cacheDir = kotlin.io.path.createTempDirectory("onestep-auto").toFile()
        OneStep.load(modelPath, LoadOptions(device = "auto", settings = "gpu_trial_software=on,gpu_pipeline_cache=$cacheDir")).use { m ->
            val note = m.deviceNote
            check(note != null && note.contains("auto chose the") && note.contains("ms on the CPU")) { "auto: ${m.device} / $note" }
            println("auto: ${m.device}: $note")
        }
        cacheDir.deleteRecursively()
    }
    expectOneStepError("truncated bytes", "half", Status.INVALID_MODEL) { OneStep.load(bytes.copyOf(bytes.size / 2), "half") }
    expectOneStepError("random bytes", "noise", Status.INVALID_MODEL) { OneStep.load(ByteArray(4096) { (it * 7919 % 251).toByte() }, "noise") }

    // Closed handles are refused in Kotlin, before reaching native code.
    val s2 = model.session()
    s2.close()
    s2.close() // idempotent
    s2.cancel() // no-op once closed
    try {
        s2.generate("hi")
        check(false) { "generate on a closed session" }
    } catch (e: IllegalStateException) {
        // expected
    }
    whisper(if (args.size > 3) args[3] else "", model)
    model.close()

    hostile(File(args[1]), true)
    hostile(File(if (args.size > 2) args[2] else "tests/fixtures/hostile"), false)

    println("$checks checks, $failures failures")
    exitProcess(if (failures == 0) 0 else 1)
}
