// Android library module: the Kotlin API (src/main/kotlin) over libonestep_jni.so (src/main/jniLibs,
// built by ./build-so.sh with the NDK). Not buildable on the project's CI machine (no Android SDK);
// there the same Kotlin sources are compiled with kotlinc and run on the desktop JVM (test-jvm).
plugins {
    id("com.android.library") version "8.7.3"
    id("org.jetbrains.kotlin.android") version "2.1.0"
}

android {
    namespace = "dev.onestep"
    compileSdk = 35
    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
        ndk {
            abiFilters += listOf("arm64-v8a", "armeabi-v7a", "x86_64")
        }
    }
    sourceSets["main"].jniLibs.srcDirs("src/main/jniLibs")
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    // Only for the optional Flow adapter (OneStepFlow.kt).
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-core:1.9.0")
}

// `./gradlew buildRustLibs` runs the NDK build of the .so files.
tasks.register<Exec>("buildRustLibs") {
    commandLine("./build-so.sh")
}
