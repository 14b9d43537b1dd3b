// One Vercel AI SDK call against the gateway, printed as one JSON line for tests/integration/test_js_clients.py.
// Usage: node clients.mjs <provider: compatible|responses|anthropic> <generate|stream> <text|tool> <gateway url>
import { generateText, streamText, tool, jsonSchema } from "ai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { createOpenAI } from "@ai-sdk/openai";
import { createAnthropic } from "@ai-sdk/anthropic";

const [provider, mode, kind, url] = process.argv.slice(2);
const model = {
  compatible: () => createOpenAICompatible({ name: "shimmy", baseURL: `${url}/v1`, apiKey: "unused", includeUsage: true })("phi3-lora"),
  responses: () => createOpenAI({ baseURL: `${url}/v1`, apiKey: "unused" }).responses("phi3-lora"),
  anthropic: () => createAnthropic({ baseURL: `${url}/v1`, apiKey: "unused" })("phi3-lora"),
}[provider]();
const tools = kind === "tool" ? {
  get_weather: tool({
    description: "The weather in a city",
    inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } }, required: ["city"] }),
  }),
} : undefined;
const request = { model, prompt: "Weather in Paris?", maxOutputTokens: 64, maxRetries: 0, tools };

let result;
if (mode === "stream") {
  const stream = streamText({ ...request, onError: ({ error }) => { throw error; } });
  let text = "";
  for await (const piece of stream.textStream) text += piece;
  result = { text, finishReason: await stream.finishReason, toolCalls: await stream.toolCalls, usage: await stream.usage };
} else {
  result = await generateText(request);
}
console.log(JSON.stringify({
  text: result.text,
  finishReason: result.finishReason,
  toolCalls: result.toolCalls.map((c) => ({ name: c.toolName, input: c.input })),
  usage: result.usage,
}));
