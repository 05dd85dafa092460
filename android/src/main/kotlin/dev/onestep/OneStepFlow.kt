package dev.onestep

// A kotlinx.coroutines Flow adapter for apps that use coroutines. Not compiled by scripts/test-bindings
// (kotlinx.coroutines is not obtainable on the test machine); the Gradle module compiles it.

import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.channelFlow
import kotlinx.coroutines.flow.flow
import kotlinx.coroutines.flow.flowOn

/** [Session.stream] as a cold Flow of text pieces, produced on [Dispatchers.Default]. */
fun Session.streamFlow(prompt: String, options: GenerateOptions = GenerateOptions()): Flow<String> =
    flow { for (piece in stream(prompt, options)) emit(piece) }.flowOn(Dispatchers.Default)

/** [Session.chatStream] as a cold Flow of text pieces. */
fun Session.chatFlow(messages: List<ChatMessage>, options: GenerateOptions = GenerateOptions()): Flow<String> =
    flow { for (piece in chatStream(messages, options)) emit(piece) }.flowOn(Dispatchers.Default)

/**
 * [Transcriber.transcribe] as a cold Flow of text pieces, produced on [Dispatchers.Default]; when the collector stops
 * (or is cancelled), the transcription stops at its next piece.
 */
fun Transcriber.transcribeFlow(
    samples: FloatArray,
    sampleRate: Int,
    options: TranscribeOptions = TranscribeOptions(),
): Flow<String> =
    channelFlow { transcribe(samples, sampleRate, options) { piece -> trySend(piece).isSuccess } }
        .buffer(Channel.UNLIMITED)
        .flowOn(Dispatchers.Default)
