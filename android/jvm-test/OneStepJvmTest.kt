// Desktop JVM test of the Kotlin API over the JNI library (run by android/test-jvm):
//   java -Djava.library.path=LIBDIR -cp test.jar OneStepJvmTestKt MODEL.onnx OWN_HOSTILE_DIR [CORPUS_DIR]
import dev.onestep.ChatMessage
import dev.onestep.GenerateOptions
import dev.onestep.LoadOptions
import dev.onestep.OneStep
import dev.onestep.OneStepException
import dev.onestep.Status
import dev.onestep.PieceListener
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
    model.close()

    hostile(File(args[1]), true)
    hostile(File(if (args.size > 2) args[2] else "tests/fixtures/hostile"), false)

    println("$checks checks, $failures failures")
    exitProcess(if (failures == 0) 0 else 1)
}
