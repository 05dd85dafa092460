// Runs on a Mac after build-xcframework.sh: ONESTEP_TEST_MODEL=/path/to/smollm2.onnx swift test
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
}
