// Send one camera frame (an image file) and a prompt to `edge-vila serve`, print the answer
// as it streams. A robot program would pass the JPEG it just grabbed instead of a file.
//
//   ask_frame --image frame.jpg --prompt "Is the path clear?" [--host 127.0.0.1] [--port 8000]
//             [--api-key KEY] [--max-tokens 64] [--expect-nonempty]
#include <cstdlib>
#include <iostream>
#include <string>

#include "edge_vila/client.hpp"

int main(int argc, char** argv) {
  std::string host = "127.0.0.1", image, prompt = "What do you see?", key;
  int port = 8000, max_tokens = 64;
  bool expect = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "missing value for " << a << "\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--host") host = next();
    else if (a == "--port") port = std::stoi(next());
    else if (a == "--image") image = next();
    else if (a == "--prompt") prompt = next();
    else if (a == "--api-key") key = next();
    else if (a == "--max-tokens") max_tokens = std::stoi(next());
    else if (a == "--expect-nonempty") expect = true;
    else {
      std::cerr << "unknown option " << a << "\n";
      return 2;
    }
  }
  edge_vila::Client client(host, port, key);
  if (!client.healthy()) {
    std::cerr << "no edge-vila server at " << host << ":" << port << " (start one: edge-vila serve BUNDLE)\n";
    return 1;
  }
  try {
    std::vector<edge_vila::Image> images;
    if (!image.empty()) images.push_back(edge_vila::Image::from_file(image));
    edge_vila::ChatOptions opts;
    opts.max_tokens = max_tokens;
    auto r = client.chat(prompt, images, [](const std::string& piece) { std::cout << piece << std::flush; }, opts);
    std::cout << "\n[finish=" << r.finish_reason << " ttft=" << r.ttft_s * 1000 << "ms total=" << r.total_s * 1000
              << "ms]\n";
    if (expect && r.text.empty()) {
      std::cerr << "empty answer\n";
      return 1;
    }
  } catch (const edge_vila::ServerError& e) {
    std::cerr << e.what() << "\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
