package dev.onestep

// A kotlinx.coroutines Flow adapter for apps that use coroutines. Not compiled by scripts/test-bindings
// (kotlinx.coroutines is not obtainable on the test machine); the Gradle module compiles it.

import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.flow
import kotlinx.coroutines.flow.flowOn

/** [Session.stream] as a cold Flow of text pieces, produced on [Dispatchers.Default]. */
fun Session.streamFlow(prompt: String, options: GenerateOptions = GenerateOptions()): Flow<String> =
    flow { for (piece in stream(prompt, options)) emit(piece) }.flowOn(Dispatchers.Default)

/** [Session.chatStream] as a cold Flow of text pieces. */
fun Session.chatFlow(messages: List<ChatMessage>, options: GenerateOptions = GenerateOptions()): Flow<String> =
    flow { for (piece in chatStream(messages, options)) emit(piece) }.flowOn(Dispatchers.Default)
