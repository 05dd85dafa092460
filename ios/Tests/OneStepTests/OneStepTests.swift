// Runs on a Mac after build-xcframework.sh:
//   ONESTEP_TEST_MODEL=/path/to/smollm2.onnx ONESTEP_TEST_WHISPER=/path/to/whisper-tiny-en.onnx swift test
import XCTest
@testable import OneStep

final class OneStepTests: XCTestCase {
    func testBadFileThrowsWithMessage() {
        XCTAssertThrowsError(try Model(path: "/nonexistent/x.onnx")) { e in
            XCTAssertTrue((e as? OneStepError)?.message.contains("x.onnx") ?? false)
        }
        XCTAssertThrowsError(try Model(data: Data([1, 2, 3]), name: "junk"))
    }

    func testLoadOptionsChooseTheDevice() throws {
        guard let path = ProcessInfo.processInfo.environment["ONESTEP_TEST_MODEL"] else {
            throw XCTSkip("set ONESTEP_TEST_MODEL to an exported model")
        }
        let cpu = try Model(path: path, options: LoadOptions(device: "cpu", kvPageRows: 16))
        XCTAssertEqual(cpu.device, "cpu")
        XCTAssertNil(cpu.deviceNote)
        // Metal on Apple GPUs; `auto` falls back to the CPU where there is none, and says why.
        let auto = try Model(path: path, options: LoadOptions(device: "auto", gpuCacheBudget: "50%"))
        XCTAssertTrue(auto.device != "cpu" || auto.deviceNote != nil)
        XCTAssertThrowsError(try Model(path: path, options: LoadOptions(device: "tpu"))) { e in
            XCTAssertEqual((e as? OneStepError)?.status, UInt32(ONESTEP_STATUS_INVALID_ARGUMENT.rawValue))
        }
    }

    func testStreamsAReply() async throws {
        guard let path = ProcessInfo.processInfo.environment["ONESTEP_TEST_MODEL"] else {
            throw XCTSkip("set ONESTEP_TEST_MODEL to an exported model")
        }
        let session = try Model(path: path).session()
        let opts = GenerateOptions(maxNewTokens: 8, temperature: 0)
        var pieces = ""
        let text = try session.generate("The capital of France is", options: opts) { pieces += $0; return true }
        XCTAssertEqual(text, pieces)
        var streamed = ""
        for try await p in session.stream("The capital of France is", options: opts) { streamed += p }
        XCTAssertEqual(streamed, text)
        // The stream's end leaves no cancel behind: the next generation runs.
        XCTAssertEqual(try session.generate("The capital of France is", options: opts), text)
    }

    /// The samples of a 16-bit PCM mono WAV with the canonical 44-byte header (the fixtures'), as floats
    /// in [-1, 1), and its rate.
    func readWav16(_ url: URL) throws -> ([Float], UInt32) {
        let b = [UInt8](try Data(contentsOf: url))
        func u16(_ o: Int) -> UInt32 { UInt32(b[o]) | UInt32(b[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { u16(o) | u16(o + 2) << 16 }
        func tag(_ o: Int, _ t: String) -> Bool { Array(b[o..<o + 4]) == Array(t.utf8) }
        guard b.count >= 44, tag(0, "RIFF"), tag(8, "WAVE"), tag(12, "fmt "), u16(20) == 1, u16(22) == 1,
              u16(34) == 16, tag(36, "data"), Int(u32(40)) <= b.count - 44 else {
            throw OneStepError(status: 0, message: "\(url.path) is not a 44-byte-header 16-bit PCM mono WAV")
        }
        let n = Int(u32(40)) / 2
        let pcm = (0..<n).map { Float(Int16(bitPattern: UInt16(u16(44 + 2 * $0)))) / 32768 }
        return (pcm, u32(24))
    }

    func testTranscribesSpeech() async throws {
        let env = ProcessInfo.processInfo.environment
        guard let path = env["ONESTEP_TEST_WHISPER"] else {
            throw XCTSkip("set ONESTEP_TEST_WHISPER to a Whisper export (whisper-tiny-en.onnx)")
        }
        let invalid = UInt32(ONESTEP_STATUS_INVALID_ARGUMENT.rawValue)
        if let text = env["ONESTEP_TEST_MODEL"] {
            XCTAssertThrowsError(try Model(path: text).transcriber()) { e in
                XCTAssertEqual((e as? OneStepError)?.status, invalid)
            }
        }
        let t = try Model(path: path).transcriber()
        XCTAssertEqual(t.sampleRate, 16000)
        let wav = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../../tests/fixtures/whisper/speech_01.wav").standardized
        let (pcm, rate) = try readWav16(wav)
        XCTAssertEqual(rate, 16000)
        let expect = "Good morning, doctor Smith."

        // Timed (the default), streamed: faster-whisper's segment, its timestamp tokens included.
        var pieces = ""
        let timed = try t.transcribe(pcm, sampleRate: rate) { pieces += $0; return true }
        XCTAssertEqual(timed.text, expect)
        XCTAssertFalse(timed.cancelled)
        XCTAssertEqual(pieces.trimmingCharacters(in: .whitespaces), expect)
        XCTAssertEqual(timed.segments.count, 1)
        XCTAssertEqual(timed.segments.first?.start, 0)
        XCTAssertEqual(timed.segments.first?.end, 2)
        XCTAssertEqual(timed.segments.first?.tokens, [50363, 4599, 3329, 11, 6253, 4176, 13, 50463])
        XCTAssertEqual(timed.stats.windows, 1)

        // Untimed: the same text, one segment for the window's 2.16 s.
        let untimed = try t.transcribe(pcm, sampleRate: rate, options: TranscribeOptions(timestamps: false))
        XCTAssertEqual(untimed.text, expect)
        XCTAssertEqual(untimed.segments.first?.end, 2.16)
        XCTAssertEqual(untimed.segments.first?.tokens, [4599, 3329, 11, 6253, 4176, 13])

        // onText returning false stops: cancelled, the text so far.
        let stopped = try t.transcribe(pcm, sampleRate: rate) { _ in false }
        XCTAssertTrue(stopped.cancelled)
        XCTAssertTrue(stopped.text.count < expect.count && expect.hasPrefix(stopped.text))

        // A cancel with nothing running stops the next call before it starts.
        t.cancel()
        let pre = try t.transcribe(pcm, sampleRate: rate)
        XCTAssertTrue(pre.cancelled && pre.text.isEmpty && pre.segments.isEmpty)

        // Typed errors.
        XCTAssertThrowsError(try t.transcribe(pcm, sampleRate: 8000)) { e in
            XCTAssertEqual((e as? OneStepError)?.status, invalid)
            XCTAssertTrue((e as? OneStepError)?.message.contains("8000") ?? false)
        }
        XCTAssertThrowsError(try t.transcribe(pcm, sampleRate: rate, options: TranscribeOptions(maxTokensPerWindow: 0))) { e in
            XCTAssertEqual((e as? OneStepError)?.status, invalid)
        }
        XCTAssertTrue(try t.transcribe([], sampleRate: rate).segments.isEmpty)

        // The AsyncSequence: the same pieces; it ends without leaving a cancel behind.
        var streamed = ""
        for try await p in t.stream(pcm, sampleRate: rate) { streamed += p }
        XCTAssertEqual(streamed, pieces)
        XCTAssertEqual(try t.transcribe(pcm, sampleRate: rate).text, expect)
    }
}
