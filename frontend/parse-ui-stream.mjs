#!/usr/bin/env node
// Parse an AI SDK UI-message-stream SSE body with the `ai` package's OWN public API
// (parseJsonEventStream + uiMessageChunkSchema + readUIMessageStream, all exported from 'ai').
//
// Usage:
//   node parse.mjs <file.sse> [--message <assistant-message.json>] [--fail-on-error-chunk]
//   cat body.sse | node parse.mjs [--message ...]
//
// Output: JSON lines on stdout
//   {"kind":"chunk","index":N,"chunk":{...}}            each chunk as validated by uiMessageChunkSchema
//   {"kind":"error-chunk","index":N,"errorText":"..."}  an {"type":"error"} chunk (the Chat would go to status "error")
//   {"kind":"message","message":{...}}                  final UIMessage assembled by readUIMessageStream
//   {"kind":"validation-error",...} / {"kind":"processing-error",...} on failure
//
// Exit codes:
//   0 ok (error chunks are valid protocol, reported but not fatal unless --fail-on-error-chunk)
//   1 schema/JSON validation error (what DefaultChatTransport would throw)
//   2 processing error (schema-valid chunk that the client state machine rejects,
//     e.g. text-delta without text-start, tool-output for unknown toolCallId)
//   3 error chunk seen and --fail-on-error-chunk given
//   4 usage / IO error

import { readFileSync } from 'node:fs';
import {
  parseJsonEventStream,
  readUIMessageStream,
  uiMessageChunkSchema,
  UIMessageStreamError,
} from 'ai';

const args = process.argv.slice(2);
let file;
let messageFile;
let failOnErrorChunk = false;
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--message') messageFile = args[++i];
  else if (a === '--fail-on-error-chunk') failOnErrorChunk = true;
  else if (a === '-h' || a === '--help') {
    console.error('usage: node parse.mjs [file.sse|-] [--message msg.json] [--fail-on-error-chunk]');
    process.exit(4);
  } else file = a;
}

const out = obj => process.stdout.write(JSON.stringify(obj) + '\n');

let bytes;
try {
  bytes = file && file !== '-' ? readFileSync(file) : readFileSync(0);
} catch (e) {
  console.error(`cannot read input: ${e.message}`);
  process.exit(4);
}
const startMessage = messageFile
  ? JSON.parse(readFileSync(messageFile, 'utf8'))
  : undefined;

const body = new ReadableStream({
  start(controller) {
    controller.enqueue(new Uint8Array(bytes));
    controller.close();
  },
});

let index = 0;
let validationError;
let processingError;
let errorChunks = 0;

// Same pipeline DefaultChatTransport.processResponseStream uses:
// parseJsonEventStream({ stream, schema: uiMessageChunkSchema }) and throw on !success.
const chunkStream = parseJsonEventStream({ stream: body, schema: uiMessageChunkSchema })
  .pipeThrough(
    new TransformStream({
      transform(result, controller) {
        const i = index++;
        if (!result.success) {
          validationError = { index: i, error: result.error, raw: result.rawValue };
          throw result.error;
        }
        out({ kind: 'chunk', index: i, chunk: result.value });
        if (result.value.type === 'error') {
          errorChunks++;
          out({ kind: 'error-chunk', index: i, errorText: result.value.errorText });
        }
        controller.enqueue(result.value);
      },
    }),
  );

let lastMessage;
for await (const message of readUIMessageStream({
  stream: chunkStream,
  message: startMessage,
  onError: error => {
    if (validationError && (error === validationError.error || error?.cause === validationError.error)) return;
    if (validationError) return; // downstream consequence of the validation error
    if (UIMessageStreamError.isInstance?.(error) || error?.name === 'AI_UIMessageStreamError') {
      processingError = error;
      return;
    }
    // {"type":"error"} chunks reach here as plain Error(errorText); already reported above
  },
})) {
  lastMessage = message;
}

if (validationError) {
  const e = validationError.error;
  // Compact the zod union error: keep only the branch whose `type` matched (if any).
  let issues = e?.cause?.issues;
  if (Array.isArray(issues) && issues[0]?.code === 'invalid_union') {
    const branch = issues[0].errors.find(
      b => !b.some(i => i.path?.[0] === 'type'),
    );
    issues = branch ?? [{ message: `unknown chunk type ${JSON.stringify(validationError.raw?.type)}` }];
  }
  const summary =
    e?.name === 'AI_JSONParseError'
      ? `invalid JSON: ${e.message}`
      : `chunk ${JSON.stringify(validationError.raw?.type)} failed uiMessageChunkSchema: ` +
        (issues ?? []).map(i => `${(i.path ?? []).join('.') || '<root>'}: ${i.message}`).join('; ');
  out({
    kind: 'validation-error',
    index: validationError.index,
    name: e?.name,
    message: summary,
    issues,
    raw: validationError.raw,
  });
  console.error(`validation error at chunk #${validationError.index}: ${summary}`);
  process.exit(1);
}

out({ kind: 'message', message: lastMessage ?? null });

if (processingError) {
  out({ kind: 'processing-error', name: processingError.name, message: processingError.message });
  console.error(`processing error: ${processingError.message}`);
  process.exit(2);
}
if (failOnErrorChunk && errorChunks > 0) {
  console.error(`${errorChunks} error chunk(s) in stream`);
  process.exit(3);
}
process.exit(0);
