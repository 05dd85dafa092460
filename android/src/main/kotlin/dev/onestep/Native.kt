package dev.onestep

/** The native methods of `libonestep_jni` (android/jni). Internal: use [OneStep], [Session] and [Transcriber]. */
internal object Native {
    init {
        System.loadLibrary("onestep_jni")
    }

    @JvmStatic external fun modelLoad(
        path: String, device: String?, gpuBackend: String?, gpuCacheBudget: String?, kvPageRows: Int,
        precision: String?, settings: String?,
    ): Long
    @JvmStatic external fun modelLoadBytes(
        bytes: ByteArray, name: String, device: String?, gpuBackend: String?, gpuCacheBudget: String?, kvPageRows: Int,
        precision: String?, settings: String?,
    ): Long
    /** [device, why `auto` chose the CPU or null]. */
    @JvmStatic external fun modelDevice(handle: Long): Array<String?>
    @JvmStatic external fun modelFree(handle: Long)
    /** [layers, vocab, maxCache, maxChunk, hasChatTemplate (0/1)]. */
    @JvmStatic external fun modelInfo(handle: Long): LongArray

    @JvmStatic external fun sessionNew(model: Long): Long
    @JvmStatic external fun sessionFree(handle: Long)
    @JvmStatic external fun sessionCancel(handle: Long)
    @JvmStatic external fun sessionReset(handle: Long)

    /** A chat turn when [prompt] is null. Negative / NaN option values mean the model's default. */
    @JvmStatic external fun sessionGenerate(
        handle: Long, prompt: String?, roles: Array<String>?, contents: Array<String>?,
        maxNewTokens: Int, temperature: Float, topK: Int, topP: Float,
        hasSeed: Boolean, seed: Long, stopStrings: Array<String>, ignoreStopTokens: Boolean,
        listener: PieceListener?,
    ): String

    @JvmStatic external fun sessionStart(
        handle: Long, prompt: String?, roles: Array<String>?, contents: Array<String>?,
        maxNewTokens: Int, temperature: Float, topK: Int, topP: Float,
        hasSeed: Boolean, seed: Long, stopStrings: Array<String>, ignoreStopTokens: Boolean,
    )

    /** The next piece of the pull generation; null once it has ended. */
    @JvmStatic external fun sessionNextPiece(handle: Long): String?
    @JvmStatic external fun sessionLastStopReason(handle: Long): String?
    /** [prompt, reused, generated, ttftMs, prefillMs, decodeMs, decodeTokPerS, stopTokenId or -1]. */
    @JvmStatic external fun sessionLastStats(handle: Long): DoubleArray?

    @JvmStatic external fun transcriberNew(model: Long): Long
    @JvmStatic external fun transcriberFree(handle: Long)
    @JvmStatic external fun transcriberCancel(handle: Long)
    @JvmStatic external fun transcriberSampleRate(handle: Long): Int

    /** The transcript as JSON (the C ABI's `onestep_transcribe` format). A null [language] is English. */
    @JvmStatic external fun transcribe(
        handle: Long, samples: FloatArray, sampleRate: Int, language: String?, translate: Boolean,
        maxTokensPerWindow: Int, timestamps: Boolean, listener: TextListener?,
    ): String
}
