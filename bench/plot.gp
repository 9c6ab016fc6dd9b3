# bench/plot.gp: max throughput and added p99 per proxy, from report.py's plot.tsv.
#   gnuplot -e "data='OUT/plot.tsv'; out='OUT/bench.png'" bench/plot.gp
set terminal pngcairo size 900,420 font ",10"
set output out
set multiplot layout 1,2 title "edge-agent vs nginx and HAProxy on loopback (make bench; see BENCHMARKS.md)"
set style data histograms
set style fill solid 0.8 border -1
set boxwidth 0.7
set style histogram clustered gap 1
set bmargin 4
set grid ytics
set yrange [0:*]
unset key
set title "max throughput (wrk, median), req/s"
plot data using 2:xtic(1) linecolor rgb "#4472c4"
set title "added p99 at 50% of nginx's max, ms"
set yrange [*<0:*]
plot data using 3:xtic(1) linecolor rgb "#ed7d31"
unset multiplot
