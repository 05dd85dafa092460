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
    }
}
