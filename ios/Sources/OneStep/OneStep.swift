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

/// A loaded model: immutable, shared by any number of sessions on any threads.
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
