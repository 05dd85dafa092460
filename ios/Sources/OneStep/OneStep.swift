// A thin Swift API over the onestep C ABI (capi/include/onestep.h). Every call maps to one C function;
// errors carry the runtime's message. Not compiled on the project's Linux CI (no Swift there): see
// README "Mobile & C ABI".
import Foundation
import OneStepFFI

/// A runtime error: the C status and the runtime's message.
public struct OneStepError: Error, CustomStringConvertible {
    /// The C status (`OnestepStatus` raw value).
    public let status: UInt32
    /// The runtime's message.
    public let message: String
    public var description: String { message }
}

@inline(__always)
func check(_ status: OnestepStatus) throws {
    if status != ONESTEP_STATUS_OK {
        throw OneStepError(status: UInt32(status.rawValue), message: String(cString: onestep_last_error()))
    }
}

/// Options of one generation; `nil` fields take the model file's defaults.
public struct GenerateOptions: Sendable {
    public var maxNewTokens: UInt32?
    public var temperature: Float?
    public var topK: UInt32?
    public var topP: Float?
    public var seed: UInt64?
    public var ignoreStopTokens = false

    public init(maxNewTokens: UInt32? = nil, temperature: Float? = nil, topK: UInt32? = nil,
                topP: Float? = nil, seed: UInt64? = nil, ignoreStopTokens: Bool = false) {
        self.maxNewTokens = maxNewTokens
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
        self.ignoreStopTokens = ignoreStopTokens
    }

    func cOptions(_ model: OpaquePointer) throws -> OnestepOptions {
        var o = OnestepOptions()
        o.struct_size = UInt32(MemoryLayout<OnestepOptions>.size)
        try check(onestep_options_default(model, &o))
        if let v = maxNewTokens { o.max_new_tokens = v }
        if let v = temperature { o.temperature = v }
        if let v = topK { o.top_k = v }
        if let v = topP { o.top_p = v }
        if let v = seed { o.has_seed = true; o.seed = v }
        o.ignore_stop_tokens = ignoreStopTokens
        return o
    }
}

/// How a model is loaded (`OnestepLoadOptions` in onestep.h).
public struct LoadOptions: Sendable {
    /// `cpu` (default), `auto` (the faster of the GPU and the CPU, timed over a few decode steps on the
    /// first load and remembered in the folder of the `gpu_pipeline_cache=DIR` setting), `gpu` or `gpu:N`.
    public var device: String
    /// `metal`, `vulkan`, `dx12` or `gl`; nil: any.
    public var gpuBackend: String?
    /// GPU memory for one session's KV cache: `all`, bytes (`48M`, `1GiB`) or a share (`50%`); the
    /// layers beyond it stay in host memory and stream through two GPU slots.
    public var gpuCacheBudget: String
    /// Positions a host KV-cache page; 0: the default (64).
    public var kvPageRows: UInt32
    /// How the CPU multiplies 4- and 8-bit weights: `fast` (default: 8-bit activations, two 8-bit
    /// digits in decode and the output layer, integer dot products) or `exact` (f32 activations:
    /// onnxruntime's results to ~1e-4, the GPU kernels' math).
    public var precision: String
    /// Further settings as `key=value` pairs separated by commas: `profile=on` and the GPU tuning keys
    /// (`gpu_variant=lanes`, `gpu_run_ahead=off`, `gpu_pipeline_cache=<dir>` to keep compiled GPU
    /// pipelines between runs, ...; the list is in the README). Empty: none.
    public var settings: String

    public init(device: String = "cpu", gpuBackend: String? = nil, gpuCacheBudget: String = "all",
                kvPageRows: UInt32 = 0, precision: String = "fast", settings: String = "") {
        self.device = device
        self.gpuBackend = gpuBackend
        self.gpuCacheBudget = gpuCacheBudget
        self.kvPageRows = kvPageRows
        self.precision = precision
        self.settings = settings
    }

    /// Calls `body` with the C options; their strings live for the call.
    func withC<R>(_ body: (UnsafePointer<OnestepLoadOptions>) throws -> R) throws -> R {
        var base = OnestepLoadOptions()
        base.struct_size = UInt32(MemoryLayout<OnestepLoadOptions>.size)
        try check(onestep_load_options_default(&base))
        base.kv_page_rows = kvPageRows
        let dev = Array(device.utf8CString)
        let budget = Array(gpuCacheBudget.utf8CString)
        let prec = Array(precision.utf8CString)
        let sets = Array(settings.utf8CString)
        let api = gpuBackend.map { Array($0.utf8CString) }
        return try dev.withUnsafeBufferPointer { d in
            try budget.withUnsafeBufferPointer { b in
                try prec.withUnsafeBufferPointer { p in
                    try sets.withUnsafeBufferPointer { st in
                        func call(_ g: UnsafePointer<CChar>?) throws -> R {
                            var o = base
                            o.device = d.baseAddress
                            o.gpu_cache_budget = b.baseAddress
                            o.precision = p.baseAddress
                            o.settings = st.baseAddress
                            o.gpu_backend = g
                            return try withUnsafePointer(to: o) { try body($0) }
                        }
                        guard let api else { return try call(nil) }
                        return try api.withUnsafeBufferPointer { try call($0.baseAddress) }
                    }
                }
            }
        }
    }
}

/// A loaded model: immutable, shared by any number of sessions and transcribers on any threads.
public final class Model: @unchecked Sendable {
    let handle: OpaquePointer

    /// Memory-maps and loads the model file at `path`.
    public init(path: String, options: LoadOptions = LoadOptions()) throws {
        var h: OpaquePointer?
        try check(options.withC { onestep_model_load_with(path, $0, &h) })
        handle = h!
    }

    /// Loads a model from bytes (e.g. a bundle resource); the bytes are copied.
    public init(data: Data, name: String = "<memory>", options: LoadOptions = LoadOptions()) throws {
        var h: OpaquePointer?
        let status = try options.withC { opts in
            data.withUnsafeBytes { (buf: UnsafeRawBufferPointer) -> OnestepStatus in
                // A non-NULL pointer even for empty data (the C ABI refuses NULL).
                let p = buf.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!
                return onestep_model_load_from_memory_with(
                    p.assumingMemoryBound(to: UInt8.self), buf.count, name, opts, &h)
            }
        }
        try check(status)
        handle = h!
    }

    /// Where the model runs: `cpu`, or the GPU adapter and its API (`"Apple A17 Pro GPU (Metal)"`).
    public var device: String { String(cString: onestep_model_device(handle)) }

    /// How a model loaded with `device: "auto"` chose its device (the decode-step times measured or
    /// remembered, or why the GPU could not be used); nil when a device was forced.
    public var deviceNote: String? { onestep_model_device_note(handle).map { String(cString: $0) } }

    deinit { onestep_model_free(handle) }

    /// A new conversation over this model.
    public func session() throws -> Session { try Session(model: self) }

    /// A new transcriber over this model, which must be a transcription model (Whisper exported by
    /// onestep-export; else `ONESTEP_STATUS_INVALID_ARGUMENT`). It keeps its own reference to the model.
    public func transcriber() throws -> Transcriber { try Transcriber(model: self) }
}

/// One conversation (one KV cache). Use from one task at a time; `cancel()` works from anywhere.
public final class Session: @unchecked Sendable {
    let handle: OpaquePointer
    let model: Model

    init(model: Model) throws {
        var h: OpaquePointer?
        try check(onestep_session_new(model.handle, &h))
        handle = h!
        self.model = model
    }

    deinit { onestep_session_free(handle) }

    /// Stops the running generation before its next step (any thread).
    public func cancel() { onestep_session_cancel(handle) }

    /// Forgets the conversation.
    public func reset() throws { try check(onestep_session_reset(handle)) }

    /// Generates a continuation of `prompt`; `onPiece` sees each text piece (return false to stop).
    @discardableResult
    public func generate(_ prompt: String, options: GenerateOptions = .init(),
                         onPiece: @escaping (String) -> Bool = { _ in true }) throws -> String {
        var o = try options.cOptions(model.handle)
        final class Box { let f: (String) -> Bool; init(_ f: @escaping (String) -> Bool) { self.f = f } }
        let box = Box(onPiece)
        let ctx = Unmanaged.passUnretained(box).toOpaque()
        var out: UnsafeMutablePointer<CChar>?
        let status = withExtendedLifetime(box) {
            onestep_session_generate(handle, prompt, &o, { text, _, _, user in
                let b = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue()
                return b.f(String(cString: text!))
            }, ctx, &out)
        }
        try check(status)
        defer { onestep_string_free(out) }
        return out.map { String(cString: $0) } ?? ""
    }

    /// The generation as an `AsyncSequence` of text pieces (pulled one token at a time off the caller's
    /// task). Cancelling the consuming task cancels the generation.
    public func stream(_ prompt: String, options: GenerateOptions = .init()) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let task = Task.detached { [self] in
                do {
                    var o = try options.cOptions(model.handle)
                    try check(onestep_session_start(handle, prompt, &o))
                    while !Task.isCancelled {
                        var piece = OnestepPiece()
                        var done = false
                        try check(onestep_session_next_piece(handle, &piece, &done))
                        if done { break }
                        continuation.yield(piece.text.map { String(cString: $0) } ?? "")
                        onestep_string_free(piece.text)
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            // The loop stops at the next piece. Not `cancel()`: this runs when the stream finishes too,
            // and a cancel flag no step consumes would stop the session's next generation before it starts.
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}

/// Options of one transcription (`OnestepTranscribeOptions` in onestep.h).
public struct TranscribeOptions: Sendable {
    /// Language code (`en`, `de`, ...) of a multilingual model; nil: English. Ignored by an English-only
    /// model; a code a multilingual model does not know is `ONESTEP_STATUS_INVALID_ARGUMENT`.
    public var language: String?
    /// Translate into English instead of transcribing (multilingual models; ignored otherwise).
    public var translate: Bool
    /// Most tokens one 30 s window's text may take (at least 1; 224 is half the decoder's positions,
    /// which also bound it).
    public var maxTokensPerWindow: UInt32
    /// Segments timed by the model's timestamp tokens, windows following the last complete segment (as
    /// faster-whisper does by default); false: one untimed segment a 30 s window.
    public var timestamps: Bool

    public init(language: String? = nil, translate: Bool = false, maxTokensPerWindow: UInt32 = 224,
                timestamps: Bool = true) {
        self.language = language
        self.translate = translate
        self.maxTokensPerWindow = maxTokensPerWindow
        self.timestamps = timestamps
    }

    /// Calls `body` with the C options; the language string lives for the call.
    func withC<R>(_ body: (UnsafePointer<OnestepTranscribeOptions>) throws -> R) throws -> R {
        var base = OnestepTranscribeOptions()
        base.struct_size = UInt32(MemoryLayout<OnestepTranscribeOptions>.size)
        try check(onestep_transcribe_options_default(&base))
        base.translate = translate
        base.max_tokens_per_window = maxTokensPerWindow
        base.timestamps = timestamps
        guard let language else { return try withUnsafePointer(to: base) { try body($0) } }
        let lang = Array(language.utf8CString)
        return try lang.withUnsafeBufferPointer { l in
            var o = base
            o.language = l.baseAddress
            return try withUnsafePointer(to: o) { try body($0) }
        }
    }
}

/// A timed piece of a transcript: the text between two timestamps, or (without timestamps) one window's.
public struct Segment: Sendable, Equatable, Decodable {
    /// Start in seconds.
    public let start: Float
    /// End in seconds.
    public let end: Float
    /// The text, with its leading space as decoded.
    public let text: String
    /// The tokens of the text (its timestamp tokens included).
    public let tokens: [UInt32]
    /// Mean log-probability of its window's chosen tokens (NaN if not finite).
    public let avgLogprob: Float
    /// Probability of the no-speech token after its window's start token (NaN if not finite).
    public let noSpeechProb: Float

    enum CodingKeys: String, CodingKey {
        case start, end, text, tokens, avgLogprob = "avg_logprob", noSpeechProb = "no_speech_prob"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        // A number that is not finite is written as null.
        func num(_ k: CodingKeys) throws -> Float { try c.decodeIfPresent(Float.self, forKey: k) ?? .nan }
        start = try num(.start)
        end = try num(.end)
        text = try c.decode(String.self, forKey: .text)
        tokens = try c.decode([UInt32].self, forKey: .tokens)
        avgLogprob = try num(.avgLogprob)
        noSpeechProb = try num(.noSpeechProb)
    }
}

/// Time and counts of one transcription.
public struct TranscribeStats: Sendable, Equatable, Decodable {
    /// Seconds of audio.
    public let audioSeconds: Double
    /// 30 s windows encoded.
    public let windows: Int
    /// Seconds spent in the encoder.
    public let encodeSeconds: Double
    /// Seconds spent in the decoder steps.
    public let decodeSeconds: Double
    /// Tokens decoded (prompts not counted).
    public let tokens: Int
    /// Audio seconds per wall second.
    public let realTimeFactor: Double

    enum CodingKeys: String, CodingKey {
        case audioSeconds = "audio_s", windows, encodeSeconds = "encode_s", decodeSeconds = "decode_s", tokens,
             realTimeFactor = "real_time_factor"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        func num(_ k: CodingKeys) throws -> Double { try c.decodeIfPresent(Double.self, forKey: k) ?? .nan }
        audioSeconds = try num(.audioSeconds)
        windows = try c.decode(Int.self, forKey: .windows)
        encodeSeconds = try num(.encodeSeconds)
        decodeSeconds = try num(.decodeSeconds)
        tokens = try c.decode(Int.self, forKey: .tokens)
        realTimeFactor = try num(.realTimeFactor)
    }
}

/// The result of one transcription.
public struct Transcript: Sendable {
    /// The segments' text joined, trimmed.
    public let text: String
    /// Stopped by `Transcriber.cancel()` or by `onText`: the transcript holds the text up to the stop.
    public let cancelled: Bool
    /// The segments, in time order.
    public let segments: [Segment]
    public let stats: TranscribeStats
    /// The same transcript as the C ABI's JSON (`onestep_transcribe` in onestep.h), which these fields
    /// are read from.
    public let json: String

    init(json: String) throws {
        struct Wire: Decodable {
            let text: String
            let cancelled: Bool
            let segments: [Segment]
            let stats: TranscribeStats
        }
        let w: Wire
        do {
            w = try JSONDecoder().decode(Wire.self, from: Data(json.utf8))
        } catch {
            throw OneStepError(status: UInt32(ONESTEP_STATUS_INTERNAL.rawValue), message: "transcript JSON: \(error)")
        }
        text = w.text
        cancelled = w.cancelled
        segments = w.segments
        stats = w.stats
        self.json = json
    }
}

/// Speech to text over a transcription model (`Model.transcriber()`): the audio in 30 s windows, decoded
/// greedily (faster-whisper's `temperature=0, beam_size=1`), with its own decoder state reused call after
/// call. Use from one task at a time (another concurrent call, or one from `onText`, throws
/// `ONESTEP_STATUS_BUSY`); `cancel()` works from anywhere.
public final class Transcriber: @unchecked Sendable {
    let handle: OpaquePointer

    init(model: Model) throws {
        var h: OpaquePointer?
        try check(onestep_transcriber_new(model.handle, &h))
        handle = h!
    }

    deinit { onestep_transcriber_free(handle) }

    /// The sample rate (samples per second) `transcribe` takes: 16000 for Whisper.
    public var sampleRate: UInt32 { onestep_transcriber_sample_rate(handle) }

    /// Stops the running transcription after the current token (its transcript so far comes back,
    /// `cancelled`); with nothing running, the next transcription stops before it starts. Any thread.
    public func cancel() { onestep_transcriber_cancel(handle) }

    /// Transcribes mono `samples` (nominally in [-1, 1], finite) recorded at `sampleRate` Hz, which must be
    /// the model's (`self.sampleRate`; resampling and mixing down to mono are the caller's): another rate, a
    /// NaN or infinite sample, more than 4 hours of audio or `maxTokensPerWindow` 0 throws
    /// `ONESTEP_STATUS_INVALID_ARGUMENT`. `onText` sees each piece of text as it is decoded (the pieces
    /// concatenate to the segments' text); returning false stops as `cancel()` does.
    @discardableResult
    public func transcribe(_ samples: [Float], sampleRate: UInt32, options: TranscribeOptions = .init(),
                           onText: @escaping (String) -> Bool = { _ in true }) throws -> Transcript {
        final class Box { let f: (String) -> Bool; init(_ f: @escaping (String) -> Bool) { self.f = f } }
        let box = Box(onText)
        let ctx = Unmanaged.passUnretained(box).toOpaque()
        var out: UnsafeMutablePointer<CChar>?
        let status = try options.withC { o in
            withExtendedLifetime(box) {
                samples.withUnsafeBufferPointer { buf -> OnestepStatus in
                    // A non-NULL pointer even for no samples (the C ABI refuses NULL).
                    let p = buf.baseAddress ?? UnsafePointer<Float>(bitPattern: MemoryLayout<Float>.alignment)!
                    return onestep_transcribe(handle, p, buf.count, sampleRate, o, { text, _, user in
                        let b = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue()
                        return b.f(String(cString: text!))
                    }, ctx, &out)
                }
            }
        }
        try check(status)
        defer { onestep_string_free(out) }
        guard let json = out else {
            throw OneStepError(status: UInt32(ONESTEP_STATUS_INTERNAL.rawValue), message: "no transcript returned")
        }
        return try Transcript(json: String(cString: json))
    }

    /// The transcription's text pieces as an `AsyncSequence` (transcribed off the caller's task). Cancelling
    /// the consuming task cancels the transcription.
    public func stream(_ samples: [Float], sampleRate: UInt32,
                       options: TranscribeOptions = .init()) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let task = Task.detached { [self] in
                do {
                    try transcribe(samples, sampleRate: sampleRate, options: options) { piece in
                        continuation.yield(piece)
                        return !Task.isCancelled
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            // `onText` stops at the next piece. Not `cancel()`: this runs when the stream finishes too, and
            // a cancel flag no piece consumes would stop the next transcription before it starts.
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}
